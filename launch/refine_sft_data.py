"""Refine SFT data (paper 3.3-3.4): checklist -> draft -> critique/revise loop -> CoT reconstruction -> verifier.

  # a local checkpoint of this project in every role, on the built-in verifiable arithmetic task
  python launch/refine_sft_data.py --task arithmetic --num_items 64 --model checkpoint:runs/sft_tiny \
      --output data/refined_arithmetic.jsonl
  # a large teacher behind an OpenAI-compatible server, your own instructions (JSONL: prompt|messages, id, answer)
  OPENAI_API_KEY=... python launch/refine_sft_data.py --input prompts.jsonl --model openai:teacher-70b \
      --base_url http://teacher:8000 --eval_model openai:judge --output data/refined.jsonl

The output is chat JSONL ready for launch/sft.py (``{"messages": [..., {"role": "assistant", "reasoning": trace,
"content": answer}], "provenance": {...}}``) plus ``<output>.stats.json`` with the counts of kept/dropped items.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("input", None, "Instructions JSONL ({'prompt'|'messages', 'id'?, 'answer'?, 'source'?}).")
flags.DEFINE_enum("task", None, ["arithmetic"], "Built-in verifiable task to take instructions from instead.")
flags.DEFINE_integer("num_items", 32, "Items taken from --task.")
flags.DEFINE_string("output", None, "Output JSONL.")
flags.DEFINE_string("model", None, "Model for every role: checkpoint:<dir> or openai:<model name>.")
for _role, _help in (("checklist", "checklist writer"), ("draft", "drafter"), ("eval", "evaluator"),
                     ("revise", "reviser"), ("cot", "CoT reconstruction")):
  flags.DEFINE_string(f"{_role}_model", None, f"Model for the {_help} role (default --model).")
flags.DEFINE_string("base_url", None, "OpenAI-compatible server for openai: models (POST <url>/v1/chat/completions).")
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key (may be unset).")
flags.DEFINE_float("timeout_s", 120.0, "HTTP request timeout.")
flags.DEFINE_integer("max_retries", 3, "HTTP retries (connection errors, timeouts, 429, 5xx).")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature of every role.")
flags.DEFINE_integer("max_tokens", 1024, "Maximum reply length per call.")
flags.DEFINE_integer("max_rounds", 3, "Evaluations per item (critique/revise loop bound).")
flags.DEFINE_integer("max_checklist_items", 6, "Checklist items kept per instruction.")
flags.DEFINE_bool("keep_unpassed", False, "Keep items whose checklist never passed (default: drop and count).")
flags.DEFINE_integer("batch_size", 16, "Items refined together (one batched call per role and round).")
flags.DEFINE_integer("seed", 0, "Sampling seed of local models; arithmetic task seed.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from nanbeige_jax.refine import (RefineConfig, Roles, arithmetic_instructions, build_chat_model,
                                   read_instructions, refine_to_jsonl)
  if (FLAGS.input is None) == (FLAGS.task is None):
    sys.exit("error: give exactly one of --input or --task")
  if not FLAGS.output:
    sys.exit("error: --output is required")
  try:
    items = read_instructions(FLAGS.input) if FLAGS.input else arithmetic_instructions(FLAGS.num_items,
                                                                                        seed=FLAGS.seed)
    cfg = RefineConfig(max_rounds=FLAGS.max_rounds, max_checklist_items=FLAGS.max_checklist_items,
                       drop_unpassed=not FLAGS.keep_unpassed)
    built = {}

    def model_for(spec):
      if not spec:
        raise ValueError("every role needs a model: set --model (or the per-role --<role>_model flags)")
      if spec not in built:
        built[spec] = build_chat_model(spec, base_url=FLAGS.base_url, api_key=os.environ.get(FLAGS.api_key_env),
                                       timeout_s=FLAGS.timeout_s, max_retries=FLAGS.max_retries,
                                       temperature=FLAGS.temperature, max_tokens=FLAGS.max_tokens, seed=FLAGS.seed)
      return built[spec]
    roles = Roles(checklist=model_for(FLAGS.checklist_model or FLAGS.model),
                  drafter=model_for(FLAGS.draft_model or FLAGS.model),
                  evaluator=model_for(FLAGS.eval_model or FLAGS.model),
                  reviser=model_for(FLAGS.revise_model or FLAGS.model),
                  cot=model_for(FLAGS.cot_model or FLAGS.model))
    stats = refine_to_jsonl(items, roles, cfg, FLAGS.output, batch_size=FLAGS.batch_size,
                            progress=lambda done, s: print(f"{done}/{len(items)} items | kept {s['written']} | "
                                                           f"dropped: checklist {s['dropped_checklist']}, verify "
                                                           f"{s['dropped_verify']}, model errors "
                                                           f"{s['dropped_model_error']}", file=sys.stderr))
  except ValueError as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(f"done: {stats['written']}/{stats['items']} items kept -> {FLAGS.output} (dropped: checklist "
        f"{stats['dropped_checklist']}, verifier {stats['dropped_verify']}, model errors "
        f"{stats['dropped_model_error']}); stats {FLAGS.output}.stats.json")


if __name__ == "__main__":
  app.run(main)
