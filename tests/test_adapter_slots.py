from adapters.slots import AdapterSlots


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def use(slots: AdapterSlots, name: str) -> None:
    slots.acquire(name)
    if name not in slots:
        for victim in slots.victims_for_one_more():
            slots.remove(victim)
        slots.add(name)
    slots.release(name)


def test_victims_skip_adapters_in_use():
    slots = AdapterSlots(2, clock=Clock())
    slots.add("a")
    slots.add("b")
    assert slots.victims_for_one_more() == ["a"]  # equal demand: least recently used
    slots.acquire("a")  # a is serving a request
    assert slots.victims_for_one_more() == ["b"]
    slots.acquire("b")
    assert slots.victims_for_one_more() == []  # everything busy: overflow until one ends
    slots.release("b")
    assert slots.victims_for_one_more() == ["b"]
    assert slots.free == 0 and slots.resident() == ["a", "b"]  # b was used last


def test_rare_adapters_take_turns_in_one_slot():
    slots = AdapterSlots(3, clock=Clock())
    for _ in range(5):
        use(slots, "hot")
        use(slots, "warm")
    loads_before = set(slots.resident())
    for rare in ["r1", "r2", "r3", "r4"]:
        use(slots, rare)
    # LRU would have pushed out hot and warm; decayed demand keeps them.
    assert {"hot", "warm"} <= set(slots.resident()) and loads_before <= {"hot", "warm"}
    assert slots.resident()[-1] == "r4"


def test_demand_decays_so_a_formerly_hot_adapter_can_go():
    clock = Clock()
    slots = AdapterSlots(2, half_life_s=10.0, clock=clock)
    for _ in range(8):
        use(slots, "old")
    clock.now = 100.0  # 10 half-lives: 8 requests now weigh 8/1024
    use(slots, "new")
    use(slots, "newer")
    assert slots.resident() == ["new", "newer"]
    assert slots.demand("old") < 0.01 < slots.demand("new")
