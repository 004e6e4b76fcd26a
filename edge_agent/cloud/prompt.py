"""The cloud pack's ``[prompt]`` for an OpenAI-compatible endpoint: a hard case — the window
and the device's local answer — becomes a request body, and a reply is parsed **strictly**:
after trimming white space and one trailing full stop, the text must equal one of the pack's
labels (case-insensitive). Anything else is an ``unparseable`` failure, never a guessed label.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError
from edge_agent.models.pack import ModelPack, PromptSpec
from edge_agent.wire.messages import LocalDecision

#: Placeholders a ``[prompt]`` template may use.
PLACEHOLDERS = (
    "labels",
    "labels_or",
    "local_label",
    "local_confidence",
    "local_reason",
    "summary",
    "channels",
    "samples",
)
#: HTTP statuses that are retried (with backoff, honouring Retry-After).


class Prompt:
    """Renders requests for one cloud pack and parses replies into its labels."""

    def __init__(self, spec: PromptSpec, labels: Sequence[str], channels: Sequence[str]) -> None:
        if not labels:
            raise ConfigError("the cloud pack has no labels to ask the endpoint for")
        self.spec = spec
        self.labels = list(labels)
        self.channels = list(channels)
        self._by_lower = {label.lower(): label for label in self.labels}
        if len(self._by_lower) != len(self.labels):
            raise ConfigError("the cloud pack's labels differ only in case; replies are ambiguous")
        self._system = string.Template(spec.system)
        self._user = string.Template(spec.user)
        for name, template in (("system", self._system), ("user", self._user)):
            used: set[str] = set()
            for match in template.pattern.finditer(template.template):
                if match.group("invalid") is not None:
                    raise ConfigError(f"prompt.{name}: a '$' that starts no placeholder")
                used.add(match.group("named") or match.group("braced") or "")
            unknown = used - {"", *PLACEHOLDERS}
            if unknown:
                raise ConfigError(
                    f"prompt.{name}: unknown placeholder(s) {sorted(unknown)};"
                    f" known: {', '.join(PLACEHOLDERS)}"
                )

    @classmethod
    def from_pack(cls, pack: ModelPack) -> Prompt:
        m = pack.manifest
        if m.prompt is None:
            raise ConfigError(
                f"cloud.pack {pack.ref} has no [prompt] table, so it cannot drive an endpoint"
                " (cloud.backend = 'endpoint'); use a pack made for it, e.g."
                " basicmotions-cloud-endpoint"
            )
        return cls(m.prompt, m.labels, m.input.channels)

    def fields(self, values: np.ndarray[Any, Any], local: LocalDecision) -> dict[str, str]:
        """The placeholder values for one window (``[channels, samples]``) and local answer."""
        rows = []
        for i, channel in enumerate(values):
            name = self.channels[i] if i < len(self.channels) else f"ch{i}"
            rows.append(
                f"{name}: mean {_num(channel.mean())}, std {_num(channel.std())},"
                f" min {_num(channel.min())}, max {_num(channel.max())}"
            )
        return {
            "labels": ", ".join(self.labels),
            "labels_or": ", ".join(self.labels[:-1]) + " or " + self.labels[-1]
            if len(self.labels) > 1
            else self.labels[0],
            "local_label": local.label,
            "local_confidence": f"{local.confidence:.2f}",
            "local_reason": local.reason or "none",
            "summary": "\n".join(rows),
            "channels": str(values.shape[0]),
            "samples": str(values.shape[1]) if values.ndim > 1 else "1",
        }

    def render(self, fields: Mapping[str, str]) -> tuple[str, str]:
        """(system text, user text)."""
        return self._system.substitute(fields), self._user.substitute(fields)

    def body(self, api: str, model: str, fields: Mapping[str, str]) -> dict[str, Any]:
        """The JSON body of a ``chat/completions`` or ``completions`` request."""
        system, user = self.render(fields)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
            "n": 1,
            "stream": False,
        }
        if self.spec.stop:
            body["stop"] = list(self.spec.stop)
        if api == "chat":
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": user})
            body["messages"] = messages
        else:
            body["prompt"] = f"{system}\n\n{user}" if system else user
        return body

    def parse(self, text: str) -> str | None:
        """The label ``text`` names exactly, or None (white space and one final '.' ignored)."""
        t = text.strip()
        if t.endswith("."):
            t = t[:-1].rstrip()
        return self._by_lower.get(t.lower())


def _num(x: Any) -> str:
    text = f"{float(x):.2f}"
    return "0.00" if text == "-0.00" else text
