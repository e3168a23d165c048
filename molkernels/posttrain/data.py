"""Post-training data in TRL's record formats, tokenised once and batched deterministically.

SFT records are {"prompt", "completion"} or {"messages"}; preference records {"prompt", "chosen",
"rejected"}, and may carry precomputed reference log-probabilities {"ref_chosen_logps",
"ref_rejected_logps"}. The text fields are strings, or lists of {"role", "content"} messages
(conversational records, as in TRL) rendered with the tokenizer's chat template, with the loss on
the assistant turns only. Records come from a list of dicts or a JSONL file. A tokenizer is any
callable str -> list of token ids with the attributes `eos_token_id` and `pad_token_id`, and for
conversational records a method `chat(messages, add_generation_prompt=False)` -> token ids;
`ByteTokenizer` is the offline default and `HFTokenizer` wraps a transformers tokenizer.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Callable, Dict, List, Sequence, Union

import torch

from .._checks import check_integer

IGNORE_INDEX = -100
SFT_FIELDS = ("prompt", "completion")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")

Records = Union[str, os.PathLike, Sequence[dict]]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then padding (256) and end of sequence (257)."""

    pad_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def __call__(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer as a callable without special tokens (the end-of-sequence token is
    appended to responses by the datasets); padding falls back to the end-of-sequence token."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token_id")
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, messages: List[dict], add_generation_prompt: bool = False) -> List[int]:
        """The token ids of `messages` rendered with the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("tokenizer: has no chat template, which conversational records need")
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"])


def load_records(source: Records, name: str) -> List[dict]:
    """A list of records from a list (or tuple) of dicts or a JSONL file (one JSON object per
    line); a missing file raises FileNotFoundError and anything else TypeError, naming `name`."""
    if isinstance(source, (str, os.PathLike)):
        records = []
        try:
            with open(source, encoding="utf-8") as f:
                lines = list(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: no such file: {os.fspath(source)}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{name}: {os.fspath(source)} is not UTF-8 text ({error})") from None
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}: line {line_number} of {os.fspath(source)} is not JSON ({error})") from None
        where = f"{os.fspath(source)}"
    elif isinstance(source, (list, tuple)):
        records = list(source)
        where = "the list"
    else:
        raise TypeError(f"{name}: expected a list of records or the path of a JSONL file, got {type(source).__name__}")
    if not records:
        raise ValueError(f"{name}: no records in {where}")
    return records


def _check_record(record, index: int, fields: Sequence[str], name: str) -> bool:
    """Whether the record is conversational (every field a message list) rather than text (every
    field a string); ValueError naming the record and field otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"{name}: record {index} is a {type(record).__name__}, expected a dict with fields {fields}")
    for field in fields:
        if field not in record:
            raise ValueError(f"{name}: record {index} is missing the field {field!r}")
        value = record[field]
        if isinstance(value, list):
            for turn, message in enumerate(value):
                if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                        and isinstance(message.get("content"), str)):
                    raise ValueError(f"{name}: record {index} field {field!r} message {turn} is not a dict with "
                                     f"string 'role' and 'content'")
            if not value:
                raise ValueError(f"{name}: record {index} field {field!r} is an empty message list")
        elif not isinstance(value, str):
            raise ValueError(f"{name}: record {index} field {field!r} is a {type(value).__name__}, expected str or "
                             f"a list of messages")
    kinds = {isinstance(record[field], list) for field in fields}
    if len(kinds) > 1:
        raise ValueError(f"{name}: record {index} mixes strings and message lists in {list(fields)}; use one kind")
    return kinds == {True}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_labels(render, messages: List[dict], where: str):
    """(token ids, mask) of a conversation rendered by render(messages, add_generation_prompt), the
    mask 1 on the assistant turns: each turn's tokens are what rendering the conversation through
    it adds to rendering the conversation before it with the generation prompt."""
    ids = render(messages, False)
    mask = [0] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:turn], True) if turn else []
        through = render(messages[:turn + 1], False)
        if through != ids[:len(through)]:
            raise ValueError(f"{where}: the chat template does not render the conversation up to turn {turn} as a "
                             f"prefix of the whole, so its assistant tokens cannot be located")
        for t in range(common_prefix(before, through), len(through)):
            mask[t] = 1
    return ids, mask


def _chat_ids(tokenizer, prompt: List[dict], response: List[dict], max_length: int, name: str, index: int,
              field: str):
    """The conversation prompt + response through the chat template, labels on the response's
    assistant turns, cut to max_length; ValueError if no response token is left."""
    chat = getattr(tokenizer, "chat", None)
    if not callable(chat):
        raise ValueError(f"tokenizer: {name} record {index} is conversational, which needs a tokenizer with a chat "
                         f"template (HFTokenizer), not {type(tokenizer).__name__}")
    where = f"{name}: record {index}"
    ids, mask = chat_labels(lambda messages, generation: list(chat(messages, add_generation_prompt=generation)),
                            prompt + response, where)
    start = common_prefix(chat(prompt, add_generation_prompt=True), ids) if prompt else 0
    labels = [token if on and t >= start else IGNORE_INDEX for t, (token, on) in enumerate(zip(ids, mask))]
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        raise ValueError(f"{where} prompt leaves no room for the {field!r} response within max_length={max_length} "
                         f"(or the response has no assistant turn)")
    return ids[:max_length], labels[:max_length]


def _response_ids(tokenize, prompt_ids: List[int], response: str, eos: int, max_length: int, name: str,
                  index: int, field: str):
    """prompt + response + eos, cut to max_length; the response keeps at least one token."""
    response_ids = _token_ids(tokenize, response, name, index, field) + [eos]
    if len(prompt_ids) >= max_length:
        raise ValueError(f"{name}: record {index} prompt has {len(prompt_ids)} tokens, leaving no room for the "
                         f"{field!r} response within max_length={max_length}")
    ids = (prompt_ids + response_ids)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels


def _token_ids(tokenize, text: str, name: str, index: int, field: str) -> List[int]:
    """tokenize(text) as a list of token ids (ints >= 0); ValueError naming the tokenizer otherwise."""
    ids = list(tokenize(text))
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"tokenizer: returned {token!r} for {name} record {index} field {field!r}; "
                             f"expected token ids (integers >= 0)")
    return ids


class _TokenizedDataset:
    def __init__(self, tokenizer: Callable[[str], List[int]], max_length: int):
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a callable str -> token ids, got {type(tokenizer).__name__}")
        for attribute in ("eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, attribute, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tokenizer: needs an integer attribute {attribute!r} (>= 0)")
        self.pad_token_id = tokenizer.pad_token_id
        self.max_length = check_integer("max_length", max_length, 2)

    def _collate(self, ids: List[List[int]], labels: List[List[int]]) -> Dict[str, torch.Tensor]:
        return collate(ids, labels, self.pad_token_id)


def _pad(sequences: List[List[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(ids: List[List[int]], labels: List[List[int]], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """A batch of token sequences padded on the right: input_ids, attention_mask and labels
    (labels -100 on the padding)."""
    return {"input_ids": _pad(ids, pad_token_id), "attention_mask": _pad([[1] * len(s) for s in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX)}


class SFTDataset(_TokenizedDataset):
    """Tokenised {"prompt", "completion"} or {"messages"} records; a batch is input_ids,
    attention_mask and labels (all but the completion, or the assistant turns, labelled -100),
    padded on the right."""

    def __init__(self, records: Records, tokenizer: Callable[[str], List[int]], *, max_length: int = 512,
                 name: str = "sft_data"):
        super().__init__(tokenizer, max_length)
        records = load_records(records, name)
        self.ids, self.labels = [], []
        for index, record in enumerate(records):
            if isinstance(record, dict) and "messages" in record:
                if not _check_record(record, index, ("messages",), name):
                    raise ValueError(f"{name}: record {index} field 'messages' is a str, expected a list of messages")
                ids, labels = _chat_ids(tokenizer, [], record["messages"], max_length, name, index, "messages")
            elif _check_record(record, index, SFT_FIELDS, name):
                ids, labels = _chat_ids(tokenizer, record["prompt"], record["completion"], max_length, name, index,
                                        "completion")
            else:
                ids, labels = _response_ids(tokenizer, _token_ids(tokenizer, record["prompt"], name, index, "prompt"),
                                            record["completion"],
                                            tokenizer.eos_token_id, max_length, name, index, "completion")
            self.ids.append(ids)
            self.labels.append(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        return self._collate([self.ids[i] for i in indices], [self.labels[i] for i in indices])


class PreferenceDataset(_TokenizedDataset):
    """Tokenised {"prompt", "chosen", "rejected"} records. A batch of B pairs holds 2B sequences,
    the B chosen ones first, so that the policy scores both in one forward pass; with precomputed
    reference log-probabilities it also holds "ref_chosen_logps" and "ref_rejected_logps" [B]."""

    def __init__(self, records: Records, tokenizer: Callable[[str], List[int]], *, max_length: int = 512,
                 name: str = "pref_data"):
        super().__init__(tokenizer, max_length)
        records = load_records(records, name)
        self.chosen, self.rejected = [], []
        # Precomputed reference log-probabilities are all or nothing: one record carrying them
        # makes them required in every record.
        with_reference = any(isinstance(r, dict) and any(f in r for f in REFERENCE_FIELDS) for r in records)
        reference = []
        for index, record in enumerate(records):
            if _check_record(record, index, PREFERENCE_FIELDS, name):
                for field, out in (("chosen", self.chosen), ("rejected", self.rejected)):
                    out.append(_chat_ids(tokenizer, record["prompt"], record[field], max_length, name, index, field))
            else:
                prompt_ids = _token_ids(tokenizer, record["prompt"], name, index, "prompt")
                self.chosen.append(_response_ids(tokenizer, prompt_ids, record["chosen"], tokenizer.eos_token_id,
                                                 max_length, name, index, "chosen"))
                self.rejected.append(_response_ids(tokenizer, prompt_ids, record["rejected"], tokenizer.eos_token_id,
                                                   max_length, name, index, "rejected"))
            if with_reference:
                for field in REFERENCE_FIELDS:
                    value = record.get(field)
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"{name}: record {index} is missing the field {field!r} (other records "
                                         f"carry precomputed reference log-probabilities)")
                    if not math.isfinite(value):
                        raise ValueError(f"{name}: record {index} field {field!r} is {value!r}, expected a finite "
                                         f"log-probability")
                reference.append([float(record["ref_chosen_logps"]), float(record["ref_rejected_logps"])])
        self.reference_logps = torch.tensor(reference, dtype=torch.float32) if with_reference else None

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        pairs = [self.chosen[i] for i in indices] + [self.rejected[i] for i in indices]
        out = self._collate([ids for ids, _ in pairs], [labels for _, labels in pairs])
        if self.reference_logps is not None:
            ref = self.reference_logps[list(indices)]
            out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return out


class BatchStream:
    """Batches of `batch_size` indices drawn without replacement, epoch after epoch, in an order
    fixed by (seed, epoch): the position (a counter) is the whole state, so a resumed stream
    continues identically."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size = check_integer("size", size, 1)
        self.batch_size = check_integer("batch_size", batch_size, 1)
        self.seed = check_integer("seed", seed, 0)
        self.position = 0
        self._epoch, self._order = -1, None

    def next_indices(self) -> List[int]:
        indices = []
        for _ in range(self.batch_size):
            epoch, offset = divmod(self.position, self.size)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
            indices.append(self._order[offset])
            self.position += 1
        return indices
