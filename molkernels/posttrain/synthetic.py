"""The offline default of `python -m molkernels posttrain`: a tiny randomly initialised Llama-style
model (a transformers config, nothing downloaded) and synthetic SFT and preference data whose two
objectives conflict.

The task is word-by-word translation through a fixed random dictionary. SFT teaches the lowercase
translation; the preference data prefers the uppercase translation (chosen) over exactly the
lowercase one (rejected). Raising the lowercase answer's likelihood (SFT) and raising the uppercase
answer's likelihood relative to it (DPO) pull the same next-token distributions in opposite
directions, so training DPO after SFT forgets SFT, as post-training pipelines do with real data.
"""

from __future__ import annotations

import random
import string
from typing import Dict, List

import torch

from .data import ByteTokenizer

SOURCE_WORDS = ("sun", "moon", "star", "tree", "leaf", "rock", "sand", "wave", "fish", "bird", "wolf", "bear",
                "rain", "snow", "wind", "fire", "salt", "milk", "bread", "seed", "road", "door", "hill", "lake")


def dictionary(seed: int = 0) -> Dict[str, str]:
    """A fixed random translation of each source word into 3 to 6 lowercase letters."""
    rng = random.Random(seed)
    return {w: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))) for w in SOURCE_WORDS}


def _sentence(rng: random.Random, words: int) -> List[str]:
    return [rng.choice(SOURCE_WORDS) for _ in range(words)]


def make_data(n_sft: int, n_pref: int, *, seed: int, words: int = 3, dictionary_seed: int = 0):
    """SFT records {"prompt", "completion"} and preference records {"prompt", "chosen", "rejected"}
    over random sentences of `words` source words (seeded, so train and held-out sets come from
    different seeds)."""
    rng = random.Random(seed)
    table = dictionary(dictionary_seed)
    sft, pref = [], []
    for _ in range(n_sft):
        sentence = _sentence(rng, words)
        sft.append({"prompt": f"translate: {' '.join(sentence)}\n=>",
                    "completion": " " + " ".join(table[w] for w in sentence)})
    for _ in range(n_pref):
        sentence = _sentence(rng, words)
        answer = " " + " ".join(table[w] for w in sentence)
        pref.append({"prompt": f"translate: {' '.join(sentence)}\n=>", "chosen": answer.upper(), "rejected": answer})
    return sft, pref


def tiny_llama(seed: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, dtype=torch.float32,
               tokenizer=None):
    """A randomly initialised Llama-style causal LM over `tokenizer`'s vocabulary (ByteTokenizer's
    by default: about 0.1M parameters at the defaults), built from a transformers LlamaConfig with
    no download. A transformers tokenizer gives its len() as the vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    vocab_size = tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else len(tokenizer)  # + added tokens
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


# A minimal chat template: each turn as "<|role|>\ncontent</s>\n", and "<|assistant|>\n" to prompt.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_bpe_tokenizer(texts, path=None, *, vocab_size: int = 300, chat_template: str = CHAT_TEMPLATE):
    """A small byte-level BPE transformers tokenizer trained here on `texts` (offline), with <pad>
    and </s> and the chat template above; saved to `path` (transformers' format) when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    if path is not None:
        fast.save_pretrained(path)
    return fast
