"""What can go wrong talking to a card; every error names the card it came from."""

from __future__ import annotations


class CardError(Exception):
    """A card could not do what was asked; ``card`` is the card's configured name."""

    def __init__(self, card: str, message: str):
        self.card = card
        super().__init__(message)


class KnobError(CardError):
    """The card answered a knob command with an ERROR line."""

    def __init__(self, card: str, site: int, knob: str, text: str):
        self.site = site
        self.knob = knob
        self.text = text
        super().__init__(card, f"{card} site {site}: {knob}: {text}")


class KnobTimeout(CardError):
    """The knob service did not finish its reply (the prompt) within the timeout."""

    def __init__(self, card: str, site: int, knob: str, timeout: float):
        self.site = site
        self.knob = knob
        self.timeout = timeout
        super().__init__(card, f"{card} site {site}: {knob}: no reply within {timeout:g} s")


class SettingRefused(CardError):
    """The driver refused a setting before sending it (range, rate or layout checks)."""

    def __init__(self, card: str, setting: str, reason: str):
        self.setting = setting
        self.reason = reason
        super().__init__(card, f"{card}: {setting}: {reason}")


class CardNotReady(CardError):
    """The stream port answered "NOT READY" (the card is booting or not configured)."""


class StreamError(CardError):
    """The stream ended without stop(): connection lost, closed by the card, callback failed."""
