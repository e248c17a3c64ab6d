"""Shared by the chat-template and SFT-data tests: a minimal real tokenizer and a golden multi-turn conversation."""


class CharTokenizer:
  """A minimal real tokenizer: one id per character (ord + 6), specials at 0..5."""
  special_ids = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3, "<think>": 4, "</think>": 5}
  pad_id = 0

  def encode(self, text):
    return [ord(c) + 6 for c in text]

  def decode(self, ids):
    inverse = {v: k for k, v in self.special_ids.items()}
    return "".join(inverse[i] if i in inverse else chr(i - 6) for i in ids)

  def fingerprint(self):
    return "char-tokenizer"


CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning": "r", "content": "A"},
    {"role": "user", "content": "Q"},
    {"role": "assistant", "content": "B"},
]

# <|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA
# <|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n   (65 ids)
GOLDEN_IDS = [1, 121, 127, 121, 122, 107, 115, 16, 89, 2, 16, 1, 123, 121, 107, 120, 16, 78, 111, 2, 16, 1, 103, 121,
              121, 111, 121, 122, 103, 116, 122, 16, 4, 16, 120, 16, 5, 16, 16, 71, 2, 16, 1, 123, 121, 107, 120, 16,
              87, 2, 16, 1, 103, 121, 121, 111, 121, 122, 103, 116, 122, 16, 72, 2, 16]
