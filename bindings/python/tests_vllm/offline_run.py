"""Runs one offline vLLM engine with the kvferry connector and writes what happened as JSON.

`python offline_run.py CONFIG.json OUT.json`; CONFIG has `model`, `prompts` (token id lists),
`max_tokens`, `rounds`, `kv_transfer_config` and optionally `events_port` and `one_at_a_time`. Between rounds vLLM's own
prefix cache is reset, so any cached tokens in later rounds came through the connector.
"""

import json
import sys
import threading
import time


def collect_events(port: int, events: list, stop: threading.Event, ready: threading.Event) -> None:
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    # The subscriber binds and vLLM's publisher connects, so nothing listens beyond loopback.
    sub.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    while not stop.is_set():
        try:
            parts = sub.recv_multipart()
        except zmq.Again:
            continue
        try:
            batch = decoder.decode(parts[-1])
        except msgspec.DecodeError as e:
            events.append({"type": "undecodable", "error": str(e)})
            continue
        for event in batch.events:
            events.append(
                {
                    "type": type(event).__name__,
                    "medium": getattr(event, "medium", None),
                    "locality": getattr(event, "locality", None),
                    "hashes": [h.hex() if isinstance(h, bytes) else h for h in getattr(event, "block_hashes", [])],
                }
            )
    sub.close()


def main() -> None:
    config = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.inputs import TokensPrompt

    events: list = []
    stop, ready = threading.Event(), threading.Event()
    extra = {}
    subscriber = None
    if "events_port" in config:
        subscriber = threading.Thread(target=collect_events, args=(config["events_port"], events, stop, ready))
        subscriber.start()
        ready.wait()
        extra["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://127.0.0.1:{config['events_port']}"
        )
    llm = LLM(
        model=config["model"],
        skip_tokenizer_init=True,
        block_size=32,
        max_model_len=1024,
        dtype="float32",
        enforce_eager=True,
        # On the CPU backend this is a share of host memory; several engines run side by side.
        gpu_memory_utilization=0.05,
        disable_log_stats=False,
        kv_transfer_config=KVTransferConfig(**config["kv_transfer_config"]),
        **extra,
    )
    params = SamplingParams(temperature=0, max_tokens=config["max_tokens"], detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in config["prompts"]]
    rounds = []
    for _ in range(config["rounds"]):
        if config.get("one_at_a_time"):
            outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        rounds.append(
            [{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0} for o in outputs]
        )
        assert llm.reset_prefix_cache()
    cached_by_source, kvferry_counters = {}, {}
    for metric in llm.get_metrics():
        if metric.name == "vllm:prompt_tokens_cached_by_source":
            cached_by_source[metric.labels["source"]] = cached_by_source.get(metric.labels["source"], 0) + metric.value
        elif metric.name.startswith("vllm:kvferry_") and hasattr(metric, "value"):
            # "name{label=value}", the connector's own labels only (not vLLM's engine and model).
            own = ",".join(f"{k}={v}" for k, v in sorted(metric.labels.items()) if k not in ("engine", "model_name"))
            name = f"{metric.name}{{{own}}}" if own else metric.name
            kvferry_counters[name] = kvferry_counters.get(name, 0) + metric.value
    if subscriber is not None:
        # Events of the last step travel after its outputs.
        time.sleep(1.0)
        stop.set()
        subscriber.join()
    result = {"rounds": rounds, "cached_by_source": cached_by_source, "events": events, "kvferry": kvferry_counters}
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
