"""Token-aware execution: TokenState, block runner, hooks, execution record."""
from .attention import AttentionInfo, multihead_attention
from .runner import ExecutionRecord, Hooks, RunOutput, run, run_block
from .state import TokenState

__all__ = ["AttentionInfo", "ExecutionRecord", "Hooks", "RunOutput", "TokenState", "multihead_attention", "run", "run_block"]
