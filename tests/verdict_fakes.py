"""Fakes of the verdict engine's edges, shared by its unit tests (real NFQUEUE tests sit in
test_verdict_netns.py and test_verdict_lab.py)."""

from __future__ import annotations

VIF = 7  # the ifindex of the fake domain's vif


class FakePacket:
    """A queued packet (what netfilterqueue.Packet offers the engine), recording verdicts."""

    def __init__(self, payload: bytes, physindev: int = VIF, physoutdev: int = 0) -> None:
        self.payload, self.physindev, self.physoutdev = payload, physindev, physoutdev
        self.mark = 0
        self.verdicts: list[str] = []

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdicts.append("accept")

    def drop(self) -> None:
        self.verdicts.append("drop")

    def repeat(self) -> None:
        self.verdicts.append("repeat")
