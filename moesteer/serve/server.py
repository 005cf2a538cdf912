"""``moesteer serve``: vLLM's own OpenAI app (``build_and_serve``) over :class:`MoesteerAsyncLLM`.

vLLM's serve flags are parsed by vLLM's own parser; the engine settings steering needs are forced
as ``VLLMEngine`` forces them (eager Model Runner V1, no async scheduling, moesteer's combiner,
worker extension and lock-step scheduler, float32 on the CPU, seed 0, 128 rows / 16384 tokens a
step unless given), and flags the hooks cannot serve are refused in one line each. The server binds
127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import os
import signal
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from moesteer.serve.requests import ServeOptions

DEFAULT_HOST = "127.0.0.1"
GRACE_S = 5
"""Seconds a response still open when the engine has stopped (after SIGTERM) gets before it is cancelled."""
# engine settings VLLMEngine also uses, applied where the command line does not set them
_DEFAULTS = {"max_num_seqs": 128, "max_num_batched_tokens": 16384, "seed": 0}
# serve flags with no steered equivalent, and why
_REFUSED = {
    "api_server_count": "several API server processes would each need moesteer's engine client; serve one",
    "headless": "a headless engine has no moesteer front end; run moesteer serve without --headless",
    "optimization_level": "steering runs vLLM eagerly (compiled graphs would replay routing without the hook); drop -O",
    "enable_return_routed_experts": "vLLM's routed-experts capture needs Model Runner V2, which steering does not "
    "hook; ask for moesteer_trace in vllm_xargs instead",
}


@dataclass(frozen=True)
class ServeCommand:
    """A ``moesteer serve`` invocation: the model, moesteer's options and vLLM's own flags."""

    model: str
    served_name: str
    options: ServeOptions
    vllm_flags: tuple[str, ...] = ()


def parse_args(command: ServeCommand) -> Namespace:
    """vLLM's serve arguments for ``command``, with steering's settings; a one-line ``ValueError``
    for a flag steering cannot serve."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from moesteer.backends.vllm.compat import check_layout, check_vllm

    check_vllm()
    parser = make_arg_parser(FlexibleArgumentParser(prog="moesteer serve"))
    for flag in ("--model", "--logits-processors", "--worker-extension-cls", "--scheduler-cls"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in command.vllm_flags):
            raise ValueError(f"{flag} is set by moesteer serve; drop it")
    base = ["--model", command.model]
    defaults = vars(parser.parse_args(base))
    try:
        args = parser.parse_args([*base, *command.vllm_flags])
    except SystemExit:
        raise ValueError(f"vLLM's serve parser refused {' '.join(command.vllm_flags)!r} (see above)") from None
    given = {name: value for name, value in vars(args).items() if value != defaults.get(name)}
    for name, reason in _REFUSED.items():
        value = given.get(name)
        if name in given and value not in (None, False) and not (type(value) is int and value <= 1):
            raise ValueError(f"--{name.replace('_', '-')}={value}: {reason}")
    check_layout({name: given[name] for name in _LAYOUT if name in given})
    validate_parsed_serve_args(args)
    return _steering_args(args, given, command)


_LAYOUT = ("enforce_eager", "compilation_config", "speculative_config", "enable_dbo", "async_scheduling")
_LAYOUT += ("data_parallel_size", "watermark_config", "attention_config")


def _steering_args(args: Namespace, given: dict, command: ServeCommand) -> Namespace:
    from transformers import AutoConfig

    from moesteer.backends.vllm.combiner import COMBINER
    from moesteer.backends.vllm.launch import family_defaults, on_gpu
    from moesteer.backends.vllm.scheduler import SCHEDULER
    from moesteer.backends.vllm.worker import EXTENSION
    from moesteer.dtypes import dtype_name, resolve_dtype
    from moesteer.serve import aliases, traces

    config = AutoConfig.from_pretrained(command.model)
    args.dtype = dtype_name(resolve_dtype(args.dtype, config, gpu=on_gpu()))
    for name, value in _DEFAULTS.items():
        if name not in given:
            setattr(args, name, value)
    for name, value in family_defaults(config, args.dtype, {}).items():
        if name not in given:
            setattr(args, name, value)
    args.host = args.host if "host" in given else DEFAULT_HOST
    args.enforce_eager, args.async_scheduling = True, False
    args.logits_processors = [COMBINER]
    args.worker_extension_cls, args.scheduler_cls = EXTENSION, SCHEDULER
    args.middleware = [*args.middleware, aliases.MIDDLEWARE, traces.MIDDLEWARE]
    if "served_model_name" not in given:
        args.served_model_name = [command.served_name]
    name = args.served_model_name[0]
    args.served_model_name = [*args.served_model_name, *(f"{name}+{alias}" for alias in command.options.aliases)]
    return args


def serve(command: ServeCommand) -> None:
    """Run the server until SIGTERM / Ctrl-C."""
    from moesteer.backends.vllm.launch import ENV_DEFAULTS

    for name, value in ENV_DEFAULTS.items():
        if name != "VLLM_ENABLE_V1_MULTIPROCESSING":  # an API server always runs the engine core apart
            os.environ.setdefault(name, value)
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    args = parse_args(command)
    import uvloop

    uvloop.run(_serve(args, command))


async def _serve(args: Namespace, command: ServeCommand) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.usage.usage_lib import UsageContext

    from moesteer.backends.vllm.compat import check_eager
    from moesteer.serve.engine_client import MoesteerAsyncLLM

    def interrupt(*_) -> None:  # SIGTERM while starting; uvicorn installs its own handler once serving
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = setup_server(args, reuse_port=False)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    check_eager(vllm_config)
    engine = MoesteerAsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats,
    )
    try:
        await engine.install(command.model, args.tokenizer, command.options, args.served_model_name[0])
        aliases = ", ".join(f"{args.served_model_name[0]}+{a}" for a in command.options.aliases) or "none"
        print(
            f"moesteer: serving {args.served_model_name[0]} at {listen_address}/v1 (aliases: {aliases})",
            file=sys.stderr,
            flush=True,
        )
        shutdown = await build_and_serve(engine, listen_address, sock, args, timeout_graceful_shutdown=GRACE_S)
    finally:
        engine.shutdown(timeout=vllm_config.shutdown_timeout)
    try:
        await shutdown
    finally:
        sock.close()


def served_name(model: str | None, resolved: str) -> str:
    """The name clients send as ``model``: MODEL as given, or the embedded model's folder name."""
    return model if model is not None else Path(resolved).name
