"""Record loading and validation, tokenisation into labelled batches, and the deterministic
batch stream."""

from __future__ import annotations

import json

import pytest
import torch

from molkernels.posttrain import ByteTokenizer, PreferenceDataset, SFTDataset, load_records
from molkernels.posttrain.data import IGNORE_INDEX, BatchStream

TOK = ByteTokenizer()


def test_sft_batch_labels_only_the_response():
    data = SFTDataset([{"prompt": "ab", "completion": "c"}, {"prompt": "x", "completion": "yz"}], TOK)
    batch = data.batch([0, 1])
    eos, pad = TOK.eos_token_id, TOK.pad_token_id
    assert batch["input_ids"].tolist() == [[97, 98, 99, eos], [120, 121, 122, eos]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 99, eos], [IGNORE_INDEX, 121, 122, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    padded = SFTDataset([{"prompt": "a", "completion": "b"}, {"prompt": "abc", "completion": "de"}], TOK).batch([0, 1])
    assert padded["input_ids"][0].tolist() == [97, 98, eos, pad, pad, pad]
    assert padded["labels"][0].tolist() == [IGNORE_INDEX, 98, eos, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert padded["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_preference_batch_puts_chosen_first():
    data = PreferenceDataset([{"prompt": "p", "chosen": "A", "rejected": "b"},
                              {"prompt": "q", "chosen": "C", "rejected": "dd"}], TOK)
    batch = data.batch([1, 0])
    first_tokens = batch["input_ids"][:, 1].tolist()
    assert first_tokens == [ord("C"), ord("A"), ord("d"), ord("b")]
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    assert "ref_chosen_logps" not in batch


def test_truncation_keeps_the_prompt_and_a_response_token():
    data = SFTDataset([{"prompt": "abcd", "completion": "efgh"}], TOK, max_length=6)
    assert data.batch([0])["input_ids"].tolist() == [[97, 98, 99, 100, 101, 102]]
    with pytest.raises(ValueError, match="sft_data: record 0 prompt has 6 tokens.*'completion'.*max_length=6"):
        SFTDataset([{"prompt": "abcdef", "completion": "g"}], TOK, max_length=6)


def test_records_from_jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    assert len(SFTDataset(str(path), TOK)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 of .*bad.jsonl is not JSON"):
        load_records(str(bad), "sft_data")


@pytest.mark.parametrize("records,match", [
    ([], "sft_data: no records"),
    ([{"prompt": "a"}], "sft_data: record 0 is missing the field 'completion'"),
    ([{"prompt": "a", "completion": "b"}, {"completion": "b"}], "sft_data: record 1 is missing the field 'prompt'"),
    ([{"prompt": "a", "completion": 3}], "record 0 field 'completion' is a int"),
    (["text"], "record 0 is a str"),
])
def test_bad_sft_records(records, match):
    with pytest.raises(ValueError, match=match):
        SFTDataset(records, TOK)


def test_bad_preference_records():
    with pytest.raises(ValueError, match="pref_data: record 1 is missing the field 'rejected'"):
        PreferenceDataset([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], TOK)
    with pytest.raises(ValueError, match="pref_data: record 1 is missing the field 'ref_chosen_logps'"):
        PreferenceDataset([{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1.0,
                            "ref_rejected_logps": -2.0},
                           {"prompt": "a", "chosen": "b", "rejected": "c"}], TOK)


def test_precomputed_reference_logps_travel_with_the_batch():
    data = PreferenceDataset([{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -1.0,
                               "ref_rejected_logps": -2.0},
                              {"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": -3.0,
                               "ref_rejected_logps": -4.0}], TOK)
    batch = data.batch([1, 0])
    assert batch["ref_chosen_logps"].tolist() == [-3.0, -1.0]
    assert batch["ref_rejected_logps"].tolist() == [-4.0, -2.0]


def test_batch_stream_covers_each_epoch_and_is_reproducible():
    stream = BatchStream(10, 4, seed=7)
    drawn = [stream.next_indices() for _ in range(5)]  # 20 indices = two epochs
    flat = sum(drawn, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled each epoch
    resumed = BatchStream(10, 4, seed=7)
    resumed.position = 8
    assert [resumed.next_indices() for _ in range(3)] == drawn[2:]
    assert BatchStream(10, 4, seed=8).next_indices() != drawn[0]
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(10, 0, seed=0)


def test_tokenizer_needs_ids():
    with pytest.raises(ValueError, match="tokenizer: needs an integer attribute 'eos_token_id'"):
        SFTDataset([{"prompt": "a", "completion": "b"}], lambda s: [1, 2])
    assert ByteTokenizer().decode(TOK("héllo") + [TOK.eos_token_id]) == "héllo"
    assert torch.tensor(TOK("é")).tolist() == [195, 169]


# ---------------------------------------------------------------- conversational records

@pytest.fixture(scope="module")
def chat_tokenizer():
    from molkernels.posttrain import HFTokenizer
    from molkernels.posttrain.synthetic import tiny_bpe_tokenizer

    return HFTokenizer(tiny_bpe_tokenizer(["hello there", "what is up", "all good", "system rules"]))


def _decode_labelled(tokenizer, ids, labels):
    """The text of the labelled tokens, one string per run of consecutive labelled positions."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.tokenizer.decode(current))
    return runs


def test_messages_record_labels_every_assistant_turn_and_nothing_else(chat_tokenizer):
    messages = [{"role": "system", "content": "system rules"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "what is up"}, {"role": "user", "content": "all good"},
                {"role": "assistant", "content": "good"}]
    data = SFTDataset([{"messages": messages}], chat_tokenizer)
    ids, labels = data.ids[0], data.labels[0]
    assert ids == chat_tokenizer.chat(messages)
    assert _decode_labelled(chat_tokenizer, ids, labels) == ["what is up</s>\n", "good</s>\n"]


def test_messages_tokenisation_is_the_one_joint_dpo_trainer_uses(chat_tokenizer):
    pytest.importorskip("trl")
    from molkernels.posttrain.trl_trainer import _tokenize_sft

    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "what is up"},
                {"role": "user", "content": "all good"}, {"role": "assistant", "content": "good"}]
    data = SFTDataset([{"messages": messages}], chat_tokenizer)
    ids, mask = _tokenize_sft(chat_tokenizer.tokenizer, {"messages": messages}, 0, None)
    assert ids == data.ids[0]
    assert [i if m else IGNORE_INDEX for i, m in zip(ids, mask)] == data.labels[0]


def test_prompt_completion_message_lists_label_the_completion_only(chat_tokenizer):
    prompt = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "all good"},
              {"role": "user", "content": "what is up"}]
    data = SFTDataset([{"prompt": prompt, "completion": [{"role": "assistant", "content": "good"}]}], chat_tokenizer)
    assert _decode_labelled(chat_tokenizer, data.ids[0], data.labels[0]) == ["good</s>\n"]


def test_conversational_preference_pairs_share_the_rendered_prompt(chat_tokenizer):
    prompt = [{"role": "user", "content": "hello there"}]
    data = PreferenceDataset([{"prompt": prompt, "chosen": [{"role": "assistant", "content": "all good"}],
                               "rejected": [{"role": "assistant", "content": "what is up"}]}], chat_tokenizer)
    (chosen, chosen_labels), (rejected, rejected_labels) = data.chosen[0], data.rejected[0]
    prompt_ids = chat_tokenizer.chat(prompt, add_generation_prompt=True)
    assert chosen[:len(prompt_ids)] == rejected[:len(prompt_ids)] == prompt_ids
    assert _decode_labelled(chat_tokenizer, chosen, chosen_labels) == ["all good</s>\n"]
    assert _decode_labelled(chat_tokenizer, rejected, rejected_labels) == ["what is up</s>\n"]
    batch = data.batch([0])
    assert batch["input_ids"].shape[0] == 2 and torch.isfinite(batch["labels"].float()).all()


def test_conversational_truncation_keeps_a_response_token_or_names_the_record(chat_tokenizer):
    record = {"messages": [{"role": "user", "content": "hello there " * 4}, {"role": "assistant", "content": "good"}]}
    prompt_length = len(chat_tokenizer.chat(record["messages"][:1], add_generation_prompt=True))
    data = SFTDataset([record], chat_tokenizer, max_length=prompt_length + 1)
    assert len(data.ids[0]) == prompt_length + 1 and data.labels[0][-1] != IGNORE_INDEX
    with pytest.raises(ValueError, match=r"sft_data: record 0 .*max_length"):
        SFTDataset([record], chat_tokenizer, max_length=prompt_length)


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "user"}]}, r"record 0 field 'messages' message 0 is not a dict with string 'role' and 'content'"),
    ({"messages": []}, r"record 0 field 'messages' is an empty message list"),
    ({"messages": "hi"}, r"record 0 field 'messages' is a str, expected a list of messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"record 0 .*no assistant turn"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": "text"}, r"record 0 mixes strings and message lists"),
    ({"prompt": "hi", "completion": 3}, r"record 0 field 'completion' is a int, expected str or a list of messages"),
])
def test_malformed_conversational_sft_records_are_named(chat_tokenizer, record, match):
    with pytest.raises(ValueError, match=match):
        SFTDataset([record], chat_tokenizer)


def test_conversational_records_need_a_chat_template(chat_tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ValueError, match=r"tokenizer: sft_data record 0 is conversational, .*not ByteTokenizer"):
        SFTDataset([record], TOK)
    from molkernels.posttrain import HFTokenizer
    from molkernels.posttrain.synthetic import tiny_bpe_tokenizer

    plain = HFTokenizer(tiny_bpe_tokenizer(["hi ok"], chat_template=None))
    with pytest.raises(ValueError, match=r"tokenizer: has no chat template"):
        SFTDataset([record], plain)
