"""The vLLM side of the `vllm` backend: run as a script in vLLM's own Python environment.

    python vllm_worker.py CONFIG.json

Stand-alone on purpose (standard library, PIL and vllm only): the vLLM environment does not have this
project installed. Protocol, one JSON object per line:
- worker -> caller, once loaded: {"ready": true, "vllm": VERSION}
- caller -> worker: {"prompts": [str], "images": [base64 PNG], "seed": int|null, "temperature": float,
  "structured": bool (default true: the config's JSON schema constrains the output, when it has one)}
- worker -> caller: {"outputs": [str], "tokens": int, "token_ids": [[int]], "prompt_token_ids": [[int]],
  "logprobs": [[{token id: logprob}]] (with "logprobs": k in the config)} or {"error": str}
vLLM's own logging goes to stderr; stdout carries the protocol alone.
"""

import base64
import io
import json
import os
import sys
import traceback


def main() -> int:
    with open(sys.argv[1]) as fh:
        cfg = json.load(fh)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by vLLM lands on stderr

    import torch

    on_cpu = cfg.get("device") == "cpu" or not torch.cuda.is_available()
    if on_cpu:  # a small KV cache (GiB): the default would take most of the machine's memory
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.get("cpu_kvcache_gib", 1)))

    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=cfg["model"],
        max_num_seqs=cfg["max_num_seqs"],
        tensor_parallel_size=cfg.get("tensor_parallel_size") or None,  # GPUs one engine spans
        seed=0,
        limit_mm_per_prompt={"image": 1},
        max_model_len=cfg.get("max_model_len") or None,
        enable_lora=bool(cfg.get("lora")),
        max_lora_rank=cfg.get("max_lora_rank"),  # vLLM's default (16) refuses larger adapters
        dtype=cfg.get("dtype") or "auto",
        # compact JSON, as the annotator was trained to write it: free whitespace wastes tokens
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        # on a CPU this flag is the share of RAM vLLM reserves
        gpu_memory_utilization=cfg["cpu_memory_utilization"] if on_cpu else cfg["gpu_memory_utilization"],
    )
    llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})
    lora = None
    if cfg.get("lora"):
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("annotator", 1, cfg["lora"])
    structured = None
    if cfg.get("schema"):
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(json=cfg["schema"])
    proto.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            inputs = [
                {"prompt": p, "multi_modal_data": {"image": Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")}}
                for p, b in zip(req["prompts"], req["images"])
            ]
            params = SamplingParams(
                max_tokens=cfg["max_new_tokens"],
                min_tokens=cfg.get("min_new_tokens", 0),
                temperature=req.get("temperature") or 0.0,
                seed=req.get("seed"),
                structured_outputs=structured if req.get("structured", True) else None,
                logprobs=cfg.get("logprobs") or None,
            )
            results = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
            outputs = [r.outputs[0].text for r in results]
            token_ids = [list(r.outputs[0].token_ids) for r in results]
            reply = {
                "outputs": outputs,
                "tokens": sum(map(len, token_ids)),
                "token_ids": token_ids,
                "prompt_token_ids": [list(r.prompt_token_ids) for r in results],
            }
            if cfg.get("logprobs"):  # per generated token: the top candidates' log-probabilities
                reply["logprobs"] = [
                    [{str(t): lp.logprob for t, lp in step.items()} for step in r.outputs[0].logprobs] for r in results
                ]
            proto.write(json.dumps(reply) + "\n")
        except Exception as err:  # the caller decides; the worker stays up for the next batch
            traceback.print_exc(file=sys.stderr)
            proto.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
    return 0


if __name__ == "__main__":  # vLLM starts helper processes: the guard is required
    sys.exit(main())
