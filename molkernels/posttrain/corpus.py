"""Real human-written text for post-training offline: the Python Language Reference.

Every CPython ships the reference's prose in the standard-library module `pydoc_data.topics` (the
text behind `help("with")`), written by the Python developers and licensed under the PSF License
Version 2. The records are built from it deterministically, so the same Python version always
gives the same records:

- Each topic's prose paragraphs (not the grammar rules, code examples, notes and lists, which are
  indented) are taken in order with their lines joined. Each paragraph q of at least two sentences
  that follows a paragraph p of the same topic gives a pair: the passage is p's last sentences and
  the answer q's first ones, each as many whole sentences as fit in `max_words` words (at least one
  for the passage and two for the answer, else the pair is skipped).
- A pair becomes a conversation: the system prompt asks to continue the passage, the user gives
  the section title and p's sentences, the assistant answers with q's. Even-numbered pairs are SFT
  records ({"messages"}); odd-numbered ones are preference records whose chosen answer is q's first
  sentence alone and whose rejected answer is q whole.
- Every fourth section title, in sorted order, is held out for evaluation; a pair that two topics
  share (some repeat a section) is kept once.

The two objectives conflict as SFT and preference data do in practice over response length: SFT
teaches the reference's full paragraphs, the preferences reward stopping after one sentence, so
DPO lowers the likelihood of exactly what SFT raised, and training DPO after SFT forgets it.
"""

from __future__ import annotations

import re
from typing import List, Tuple

SYSTEM_PROMPT = "Continue the passage of the Python Language Reference."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def _prose_paragraphs(text: str) -> Tuple[str, List[str]]:
    """(title, prose paragraphs) of one topic's text."""
    blocks = re.split(r"\n\s*\n", text.strip())
    title = blocks[0].splitlines()[0].strip()
    paragraphs = []
    for block in blocks[1:]:
        lines = block.splitlines()
        if any(line.startswith((" ", "\t")) for line in lines) or set(lines[-1].strip()) <= set("*=-~"):
            continue  # grammar, code, notes, lists and headings are indented or underlined
        paragraph = " ".join(line.strip() for line in lines)
        if paragraph.endswith("."):
            paragraphs.append(paragraph)
    return title, paragraphs


def _sentences(paragraph: str) -> List[str]:
    return _SENTENCE_END.split(paragraph)


def _fit(sentences: List[str], max_words: int) -> List[str]:
    """The longest leading run of `sentences` with at most max_words words in all."""
    kept, words = [], 0
    for sentence in sentences:
        words += len(sentence.split())
        if words > max_words:
            break
        kept.append(sentence)
    return kept


def python_reference_records(*, max_words: int = 32):
    """(sft_train, pref_train, sft_eval, pref_eval): conversational SFT records {"messages"} and
    preference records {"prompt", "chosen", "rejected"} (message lists) from the Python Language
    Reference, as the module docstring describes."""
    from pydoc_data.topics import topics

    sft = {False: [], True: []}
    pref = {False: [], True: []}
    sections = {topic: _prose_paragraphs(text) for topic, text in topics.items()}
    titles = sorted({title for title, _ in sections.values()})
    held_out_titles = set(titles[3::4])
    count, seen = 0, set()
    for topic in sorted(sections):
        title, paragraphs = sections[topic]
        held_out = title in held_out_titles
        for before, after in zip(paragraphs, paragraphs[1:]):
            passage = _fit(_sentences(before)[::-1], max_words)[::-1]
            answer = _fit(_sentences(after), max_words)
            if not passage or len(answer) < 2 or (before, after) in seen:
                continue
            seen.add((before, after))
            prompt = [{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": f"{title}: {' '.join(passage)}"}]
            if count % 2 == 0:
                sft[held_out].append({"messages": prompt + [{"role": "assistant", "content": " ".join(answer)}]})
            else:
                pref[held_out].append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer[0]}],
                                       "rejected": [{"role": "assistant", "content": " ".join(answer)}]})
            count += 1
    for records, what in ((sft, "SFT"), (pref, "preference")):
        if not records[False] or not records[True]:
            raise ValueError(f"python-reference corpus: no {what} records (pydoc_data.topics of this Python "
                             f"has too little prose within max_words={max_words})")
    return sft[False], pref[False], sft[True], pref[True]
