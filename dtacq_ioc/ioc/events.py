"""The events an update of a PV posts, as an EPICS record posts them.

A record posts its value with DBE_VALUE | DBE_LOG when the value changes, and adds
DBE_ALARM when its alarm status or severity changed; an alarm change alone posts
DBE_ALARM only; DBE_PROPERTY is posted when metadata changes. A subscription gets
only the events its mask names (`caproto_adapter.wanted`): `camonitor -m a` shows
alarm changes, a Phoebus DBE_PROPERTY monitor metadata changes, not every frame.

caproto posts a number's new value with no event bits at all and an alarm change
with DBE_VALUE, so the bits are worked out here from what changed.
"""

from __future__ import annotations

from caproto import AlarmSeverity, AlarmStatus, SubscriptionType

VALUE_EVENTS = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG
_NO_ALARM = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)  # a caproto PV's alarm at start


class PostedEvents:
    """Mixed into every PV, first in its classes: publishes with EPICS base's event bits."""

    async def publish(self, flags: int) -> None:
        events = flags & SubscriptionType.DBE_PROPERTY
        # caproto's value writes carry no bits (numbers) or DBE_VALUE | DBE_LOG (enums,
        # text); an alarm's publish carries DBE_ALARM, with DBE_VALUE but never DBE_LOG.
        if not flags or flags & SubscriptionType.DBE_LOG:
            events |= VALUE_EVENTS
        alarm = (self.status, self.severity)  # type: ignore[attr-defined]  # mixin: caproto's class is later in the MRO
        if alarm != self.__dict__.get("_posted_alarm", _NO_ALARM):
            self.__dict__["_posted_alarm"] = alarm
            events |= SubscriptionType.DBE_ALARM
        if events:
            await super().publish(events)  # type: ignore[misc]  # mixin: caproto's class is later in the MRO
