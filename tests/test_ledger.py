"""The router's in-flight token ledger (pure logic)."""

from ruvllm.router.ledger import InflightLedger


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_assign_and_release_balance_per_replica():
    ledger = InflightLedger()
    ledger.assign("a", "r1", 100)
    ledger.assign("b", "r1", 50)
    ledger.assign("c", "r2", 10)
    assert ledger.tokens("r1") == 150 and ledger.tokens("r2") == 10
    ledger.release("a")
    ledger.release("a")  # idempotent
    assert ledger.tokens("r1") == 50
    assert ledger.requests("r1") == 1
    ledger.release("b")
    ledger.release("c")
    assert ledger.tokens("r1") == 0 and len(ledger) == 0


def test_reassigning_a_request_moves_its_tokens():
    ledger = InflightLedger()
    ledger.assign("a", "r1", 100)
    ledger.assign("a", "r2", 100)
    assert ledger.tokens("r1") == 0 and ledger.tokens("r2") == 100


def test_stale_entries_expire_and_dead_replicas_drop():
    clock = Clock()
    ledger = InflightLedger(ttl_s=100, clock=clock)
    ledger.assign("old", "r1", 10)
    clock.now = 50
    ledger.assign("new", "r1", 20)
    clock.now = 120
    assert ledger.purge_expired() == 1
    assert ledger.tokens("r1") == 20
    ledger.drop_replica("r1")
    assert ledger.tokens("r1") == 0 and len(ledger) == 0
