"""SFT data refinement (paper 3.3-3.4): checklist -> draft -> critique/revise loop -> CoT reconstruction, with
pluggable role models (a checkpoint of this project or an OpenAI-compatible HTTP endpoint) and a verifier gate."""
from nanbeige_jax.refine.models import (ChatModel, LocalChatModel, ModelError, OpenAIChatModel, build_chat_model)
from nanbeige_jax.refine.parsing import Verdict, parse_checklist, parse_verdicts
from nanbeige_jax.refine.pipeline import (Instruction, RefineConfig, Roles, arithmetic_instructions,
                                          read_instructions, refine_item, refine_to_jsonl)

__all__ = ["ChatModel", "LocalChatModel", "ModelError", "OpenAIChatModel", "build_chat_model", "Verdict",
           "parse_checklist", "parse_verdicts", "Instruction", "RefineConfig", "Roles", "arithmetic_instructions",
           "read_instructions", "refine_item", "refine_to_jsonl"]
