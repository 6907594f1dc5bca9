"""Reasoning inside ``content``: ``<think>…</think>`` from an upstream without a reasoning parser.

A vLLM serving K2 Thinking without ``--reasoning-parser`` returns the reasoning as ordinary content:
the prompt pre-fills ``<think>``, so the text starts inside the reasoning and only ``</think>`` marks
its end (protocols.md §4.2); a tool-call section (``<|tool_calls_section_begin|>``) also ends it,
since K2 sometimes starts calling tools without closing its thoughts. Other upstreams may emit an
explicit ``<think>`` anywhere. :class:`ThinkSplitter` separates the two kinds of text as it streams
in, holding back only the few characters that could be the start of a tag.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"
SECTION = "<|tool_calls_section_begin|>"  # ends reasoning too, and stays in content for the tool parser


def _partial_tag(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    if "<" not in text[-max(len(t) for t in tags) :]:
        return 0
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ThinkSplitter:
    """Splits content text into (reasoning, content) as it arrives; joined outputs equal the
    whole-text split whatever the chunking."""

    __slots__ = ("_held", "thinking")

    def __init__(self, starts_thinking: bool = False) -> None:
        self.thinking = starts_thinking
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self.thinking:
                close, section = text.find(CLOSE), text.find(SECTION)
                ends = [i for i in (close, section) if i >= 0]
                if not ends:
                    keep = _partial_tag(text, (CLOSE, SECTION))
                    reasoning.append(text[: len(text) - keep])
                    self._held = text[len(text) - keep :]
                    break
                end = min(ends)
                reasoning.append(text[:end])
                self.thinking = False
                text = text[end + len(CLOSE) :] if end == close else text[end:]
            else:
                start = text.find(OPEN)
                if start < 0:
                    keep = _partial_tag(text, (OPEN,))
                    content.append(text[: len(text) - keep])
                    self._held = text[len(text) - keep :]
                    break
                content.append(text[:start])
                self.thinking = True
                text = text[start + len(OPEN) :]
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held as a possible tag start is plain text after all."""
        held, self._held = self._held, ""
        return (held, "") if self.thinking else ("", held)


def split_think(text: str, starts_thinking: bool = False) -> tuple[str, str]:
    """The whole-text split: (reasoning, content)."""
    splitter = ThinkSplitter(starts_thinking)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2
