from adapters.slots import AdapterSlots


def test_lru_victims_skip_adapters_in_use():
    slots = AdapterSlots(2)
    slots.add("a")
    slots.add("b")
    assert slots.victims_for_one_more() == ["a"]
    slots.acquire("a")  # a is serving a request and becomes most recent
    assert slots.victims_for_one_more() == ["b"]
    slots.acquire("b")
    assert slots.victims_for_one_more() == []  # everything busy: overflow until one ends
    slots.release("b")
    assert slots.victims_for_one_more() == ["b"]
    assert slots.free == 0 and slots.resident() == ["a", "b"]  # b was used last
