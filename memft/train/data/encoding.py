"""Tokenisation: rows -> examples of `input_ids` and `labels` (-100 where nothing is learnt), cut to
data.max_seq_len, with a note per source on the rows dropped or truncated.

- `text`: one document per row in `text_field`; every token is trained on.
- `alpaca`: `instruction`, optional `input`, `output`, rendered with the prompt template below.
- `chat`: `messages` (list of {role, content}) rendered by the chat template: data.chat_template, else the
  tokenizer's.
For alpaca and chat with `loss_on: response`, prompt tokens get label -100 so only responses are learnt.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from memft.errors import DataError
from memft.train.recipe import DataSection, DatasetSource

IGNORE_INDEX = -100
PROBE = [{"role": "user", "content": "memft-probe-question"}, {"role": "assistant", "content": "memft-probe-answer"}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction prompt; the response follows directly after it."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def with_chat_template(tokenizer, data: DataSection):
    """`tokenizer` carrying data.chat_template when the recipe sets one, so that the saved model (final/,
    `memft export`) renders conversations as they were trained."""
    template = load_chat_template(data, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_chat_template(data: DataSection, tokenizer) -> str | None:
    """data.chat_template's text (read from the file when it ends in .jinja), once it renders a conversation
    with the tokenizer; None when the recipe keeps the tokenizer's own."""
    value = data.chat_template
    if value is None:
        return None
    if value.endswith(".jinja"):
        try:
            template = Path(value).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DataError(f"data.chat_template: file '{value}' does not exist. Check the path (relative paths are "
                            "resolved from the current directory), or give the template's Jinja text.") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"data.chat_template: cannot read '{value}' as UTF-8 text ({exc}).") from exc
        where = f"the template in '{value}'"
    else:
        template, where = value, "the template"
    text = _render(tokenizer, PROBE, template, where, "a user and an assistant message")
    if not all(message["content"] in text for message in PROBE):
        raise DataError(f"data.chat_template: {where} does not write the messages' content (a value ending in "
                        ".jinja is read from that file; any other value is the Jinja text itself, which must "
                        "render each message's {{ message['content'] }}).")
    return template


def _render(tokenizer, messages: list[dict], template: str | None, where: str, what: str, **options) -> str:
    """`apply_chat_template` to text; a template error raises a DataError naming the template."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
    except jinja2.TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        fix = "" if template is not None else " Set data.chat_template to a template that can."
        raise DataError(f"data.chat_template: {where} cannot render {what}: {exc.message or type(exc).__name__}"
                        f"{line}.{fix}") from exc


def encode_row(row: dict, source: DatasetSource, tokenizer, loss_on: str,
               chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row, before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if source.format == "text":
        ids = tokenizer(str(row[source.text_field]))["input_ids"] + eos
        return ids, list(ids)
    if source.format == "alpaca":
        prompt = tokenizer(alpaca_prompt(str(row["instruction"]), str(row.get("input") or "")))["input_ids"]
        response = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + eos
        prompt_labels = [IGNORE_INDEX] * len(prompt) if loss_on == "response" else list(prompt)
        return prompt + response, prompt_labels + response
    return _encode_chat(row["messages"], tokenizer, loss_on, chat_template)


def _encode_chat(messages: list[dict], tokenizer, loss_on: str,
                 template: str | None) -> tuple[list[int], list[int]]:
    """Render with the chat template; label only the assistant turns (found by rendering prefixes): the tokens
    that end inside one, so a first token that takes in the template's space before the reply is learnt."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("data format 'chat' needs a chat template, and this tokenizer has none. Set "
                        "data.chat_template (Jinja text or a .jinja file), use format 'alpaca' or 'text', or a "
                        "model whose tokenizer defines chat_template.")
    where = "the tokenizer's chat template" if template is None else "the template"

    def render(part: list[dict], **options) -> str:
        return _render(tokenizer, part, template, where, "a row's messages", **options)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            spans.append((len(render(messages[:i], add_generation_prompt=True)), len(render(messages[: i + 1]))))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if loss_on == "all":
        return ids, list(ids)
    labels = [tok if any(s < b <= e for s, e in spans) else IGNORE_INDEX
              for tok, (_, b) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def tokenize_rows(rows, source: DatasetSource, tokenizer, data: DataSection, key: str,
                  notes: list[str] | None = None, chat_template: str | None = None) -> list[dict]:
    """Encode rows, truncated to data.max_seq_len, and drop those left without a trainable token; one sentence
    counting rows read, dropped (and why) and truncated is appended to `notes`. `chat_template`: the text from
    `load_chat_template`, or None for the tokenizer's."""
    no_assistant = "no assistant message"
    beyond = f"no trainable token within data.max_seq_len={data.max_seq_len} (raise data.max_seq_len)"
    examples, dropped, truncated = [], Counter(), 0
    for row in rows:
        if (source.format == "chat" and data.loss_on == "response"
                and not any(m["role"] == "assistant" for m in row["messages"])):
            dropped[no_assistant] += 1
            continue
        ids, labels = encode_row(row, source, tokenizer, data.loss_on, chat_template)
        cut = len(ids) > data.max_seq_len
        if cut:
            ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        if not any(label != IGNORE_INDEX for label in labels):
            dropped[beyond if cut else "no trainable token"] += 1
            continue
        truncated += cut
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        if set(dropped) == {no_assistant}:
            raise DataError(f"{key}: no row of '{source.path}' has a message with role 'assistant', so with "
                            "data.loss_on=response there is nothing to learn. Chat rows need at least one "
                            '{"role": "assistant", "content": ...} message (or set data.loss_on=all).')
        raise DataError(f"{key}: no row of '{source.path}' has a trainable token after tokenisation and "
                        f"truncation to data.max_seq_len={data.max_seq_len}. Raise max_seq_len or check the data.")
    if notes is not None:
        notes.append(_row_note(key, len(rows), dropped, truncated, data))
    return examples


def _row_note(key: str, read: int, dropped: Counter, truncated: int, data: DataSection) -> str:
    """E.g. 'data.train: 12 of 1,500 rows dropped: no assistant message; 180 rows truncated to ...'."""
    parts = []
    if dropped:
        reasons = (next(iter(dropped)) if len(dropped) == 1
                   else ", ".join(f"{n:,} with {reason}" for reason, n in dropped.items()))
        parts.append(f"{sum(dropped.values()):,} of {count(read, 'row')} dropped: {reasons}")
    if truncated:
        counted = count(truncated, "row") if parts else f"{truncated:,} of {count(read, 'row')}"
        parts.append(f"{counted} truncated to data.max_seq_len={data.max_seq_len}")
    if not parts:
        parts.append(f"{count(read, 'row')} read, none dropped or truncated")
    return f"{key}: {'; '.join(parts)}."


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 row', '1,500 rows'."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
