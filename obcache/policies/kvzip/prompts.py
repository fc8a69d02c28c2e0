"""KVzip's context reconstruction prompt (arXiv 2505.23416): the model is asked to repeat its context.

After the prefill of a context, the model is teacher-forced through a copy
of it, one chunk per forward, each on a scratch copy of the full cache (the
chunk's own tokens are never kept, and the chunks do not see each other):

    chunk 0:  "\\n\\nRepeat the previous context exactly." + answer header + chunk 0
    chunk i:  "\\n\\nRepeat the part of the previous context exactly, starting with "
              + last 8 tokens of chunk i-1 + answer header + chunk i
"""

from __future__ import annotations

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP = 8  # tokens of the previous chunk that tell the model where to start


def answer_header(tokenizer, chat_template: bool = True) -> str:
    """What the chat template puts between a user message and the assistant's answer ("\\n" without one)."""
    if not chat_template or tokenizer.chat_template is None:
        return "\n"
    marker = "\x00OBCACHE\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    return rendered.split(marker, 1)[1]


def reconstruction_inputs(tokenizer, context_ids: list[int], *, chunk: int, chat_template: bool = True) -> list[list[int]]:
    """The teacher-forced inputs that make the model repeat `context_ids`, one list per chunk of `chunk` tokens."""
    if chunk < 1:
        raise ValueError(f"the reconstruction chunk must be >= 1 token, got {chunk}")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    header = encode(answer_header(tokenizer, chat_template))
    chunks = [context_ids[start:start + chunk] for start in range(0, len(context_ids), chunk)]
    inputs = []
    for index, part in enumerate(chunks):
        prompt = encode(FIRST_PROMPT) if index == 0 else encode(NEXT_PROMPT) + chunks[index - 1][-OVERLAP:]
        inputs.append(prompt + header + part)
    return inputs
