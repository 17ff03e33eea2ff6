from ruvllm.adapters.slots import AdapterSlots


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


def test_a_request_during_its_adapters_eviction_reloads_it_instead_of_failing():
    """Replica logic with a fake engine: request 1 needs a slot and evicts idle adapter
    `a`; request 2 for `a` arrives while the unload is in flight. It must wait and load `a`
    again, not take the resident fast path and reach the engine after the unload."""
    import asyncio
    import types

    from ruvllm.deployments.protocol import ReplyHead
    from ruvllm.deployments.replica import LLMReplica
    from ruvllm.router.hints import RoutingHints

    class FakeEngine:
        is_dead = False  # the Engine protocol's flag: this engine is alive

        def __init__(self) -> None:
            self.loaded = {"a"}

        async def unload_adapter(self, name: str) -> None:
            await asyncio.sleep(0.05)
            self.loaded.discard(name)

        async def load_adapter(self, name: str, path: str) -> None:
            await asyncio.sleep(0.01)
            self.loaded.add(name)

    noop = types.SimpleNamespace(inc=lambda **_: None, set=lambda *_: None)
    replica = LLMReplica.__new__(LLMReplica)
    replica._replica_id = "r"
    replica._engine = engine = FakeEngine()
    replica._slots = AdapterSlots(1)
    replica._slots.add("a")
    replica._adapter_lock = asyncio.Lock()
    replica._adapter_counts = {"loads": 0, "plan_loads": 0, "evictions": 0, "hits": 0}
    replica._metrics = types.SimpleNamespace(loads=noop, evictions=noop, hits=noop,
                                             resident=noop)
    seen: dict[str, bool] = {}

    def method_for(adapter: str):
        async def method(body, request_id):
            # vLLM needs the adapter from the request's start to its last token.
            at_start = adapter in engine.loaded
            await asyncio.sleep(0.06)
            seen[adapter] = at_start and adapter in engine.loaded
            yield ReplyHead(200)  # a stream's head, then its chunks (ruvllm.deployments.protocol)
            yield "done"
        return method

    async def request(adapter: str, delay: float) -> list:
        await asyncio.sleep(delay)
        hints = RoutingHints(adapter=adapter, adapter_path=f"/{adapter}")
        return [item async for item in replica._serve(method_for(adapter), {}, adapter, hints)]

    async def main() -> None:
        # `a` is asked for once `b` has loaded, while `a`'s unload is in flight.
        await asyncio.gather(request("b", 0), request("a", 0.03))

    asyncio.run(main())
    assert seen == {"b": True, "a": True}
    assert replica._adapter_counts["loads"] == 2 and replica._adapter_counts["evictions"] == 1


def test_an_adapter_that_fails_to_load_evicts_nobody():
    """Replica logic with a fake engine whose load of `broken` fails (its files spoiled
    after registration): the full replica's resident adapters stay loaded, the request
    gets a 422, and the residents keep serving. The e2e version, with vLLM loading
    spoiled files: tests/e2e/test_adapters.py."""
    import asyncio
    import types

    from ruvllm.deployments.protocol import ReplyHead
    from ruvllm.deployments.replica import LLMReplica
    from ruvllm.router.hints import RoutingHints

    class FakeEngine:
        is_dead = False

        def __init__(self) -> None:
            self.loaded = {"a", "b"}

        async def unload_adapter(self, name: str) -> None:
            await asyncio.sleep(0.01)
            self.loaded.discard(name)

        async def load_adapter(self, name: str, path: str) -> None:
            await asyncio.sleep(0.01)
            if name == "broken":
                raise RuntimeError("adapter_model.safetensors: header too large")
            self.loaded.add(name)

    noop = types.SimpleNamespace(inc=lambda **_: None, set=lambda *_: None)
    replica = LLMReplica.__new__(LLMReplica)
    replica._replica_id = "r"
    replica._engine = engine = FakeEngine()
    replica._slots = AdapterSlots(2)
    replica._slots.add("a")
    replica._slots.add("b")
    replica._adapter_lock = asyncio.Lock()
    replica._adapter_counts = {"loads": 0, "plan_loads": 0, "evictions": 0, "hits": 0}
    replica._metrics = types.SimpleNamespace(loads=noop, evictions=noop, hits=noop,
                                             resident=noop)

    async def method(body, request_id):
        yield ReplyHead(200, {"served": body["model"] in engine.loaded})

    async def request(adapter: str) -> list:
        hints = RoutingHints(adapter=adapter, adapter_path=f"/{adapter}")
        return [item async for item in replica._serve(method, {"model": adapter}, adapter,
                                                      hints)]

    (head,) = asyncio.run(request("broken"))
    assert head.status == 422 and "could not be loaded" in head.body["error"]["message"]
    assert engine.loaded == {"a", "b"} and replica._slots.resident() == ["a", "b"]
    assert replica._adapter_counts["evictions"] == 0
    for name in ("a", "b"):
        (head,) = asyncio.run(request(name))
        assert head.status == 200 and head.body == {"served": True}
