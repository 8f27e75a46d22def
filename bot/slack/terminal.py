"""A card as a terminal shows it: plain text with the card's emoji codes as emoji, for
`signoff demo`.
"""

from __future__ import annotations

import re

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)

from bot.slack.cards import Card
from bot.slack.mrkdwn import to_plain

__all__ = ["render_text"]

# The emoji codes the card uses, as terminals show them.
_EMOJI_TEXT = {
    ":large_green_circle:": "🟢",
    ":large_yellow_circle:": "🟡",
    ":large_orange_circle:": "🟠",
    ":red_circle:": "🔴",
    ":white_circle:": "⚪",
    ":hourglass_flowing_sand:": "⏳",
    ":hourglass:": "⌛",
    ":white_check_mark:": "✅",
    ":x:": "❌",
    ":no_entry_sign:": "🚫",
    ":warning:": "⚠️",
    ":rotating_light:": "🚨",
    ":stopwatch:": "⏱",
    ":link:": "🔗",
    ":ghost:": "👻",
    ":bust_in_silhouette:": "👤",
}
_EMOJI_CODE = re.compile(r":[a-z_]+:")
# Bold and italic markers as Slack reads them: around a word-bounded run on one line.
_BOLD = re.compile(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])")
_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+)_(?![\w_])")


def render_text(card: Card) -> str:
    """The card as a terminal shows it (for `signoff demo`)."""
    lines: list[str] = []
    for block in card.blocks:
        if isinstance(block, HeaderBlock) and block.text is not None:
            title = block.text.text
            lines.extend([title, "=" * min(len(title), 72)])
        elif isinstance(block, SectionBlock):
            if block.text is not None:
                lines.append(_plain(block.text.text))
            for field in block.fields or []:
                label, _, value = field.text.partition("\n")
                lines.append(f"{_plain(label.strip('*'))}: {_plain(value)}")
        elif isinstance(block, ContextBlock):
            texts = [_plain(e.text) for e in block.elements if isinstance(e, MarkdownTextObject)]
            lines.append(" · ".join(texts))
        elif isinstance(block, DividerBlock):
            lines.append("-" * 40)
        elif isinstance(block, ActionsBlock):
            buttons = [
                f"[ {element.text.text} ]"
                for element in block.elements
                if isinstance(element, ButtonElement) and element.text is not None
            ]
            lines.append(" ".join(buttons))
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    shown = _BOLD.sub(r"\1", _ITALIC.sub(r"\1", to_plain(text)))
    return _EMOJI_CODE.sub(lambda match: _EMOJI_TEXT.get(match.group(0), match.group(0)), shown)
