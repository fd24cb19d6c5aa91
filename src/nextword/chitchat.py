"""The default chat corpus, from the pinned ``chitchat_dataset`` package (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def chitchat_messages() -> pd.DataFrame:
    """One row per message: conversation_id, turn, speaker, text.

    Turns alternate between the two people. Some conversations reuse one
    sender id for both sides, so the speaker follows the turn: even turns
    are ``user``, odd turns ``agent``.
    """
    import chitchat_dataset

    path = Path(chitchat_dataset.__file__).with_name("dataset.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = []
    for conversation_id, conversation in data.items():
        for turn, messages in enumerate(conversation["messages"]):
            speaker = "user" if turn % 2 == 0 else "agent"
            for message in messages:
                rows.append((conversation_id, turn, speaker, message["text"]))
    return pd.DataFrame(rows, columns=["conversation_id", "turn", "speaker", "text"])
