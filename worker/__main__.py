"""python -m worker: serve a model on the tokenbus."""

from worker.threads import prepare_openmp_environment, set_torch_threads

prepare_openmp_environment()  # OpenMP reads it once, when torch loads: before the imports below

import logging
import signal

from broker import protocol
from broker.settings import load_settings
from worker.config import WorkerSettings
from worker.engine import Engine
from worker.grammar import GrammarCompiler
from worker.loader import load_model
from worker.prompt import PromptEncoder
from worker.runner import ModelRunner
from worker.scheduler import Scheduler, SchedulerLimits
from worker.server import WorkerServer


def build_engine(settings: WorkerSettings) -> tuple[Engine, protocol.Ready]:
    loaded = load_model(settings)
    tokenizer = loaded.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limits = SchedulerLimits(
        max_batch=settings.max_batch,
        max_batch_tokens=settings.max_batch_tokens or settings.max_batch * loaded.context_length,
        # About half a second of prefill on a CPU: running streams pause no longer than that.
        max_prefill_tokens=settings.max_prefill_tokens or (4096 if loaded.model.device.type == "cuda" else 512),
    )
    prompts = PromptEncoder(tokenizer, loaded.model.generation_config.eos_token_id)
    unpenalized = prompts.stop_token_ids | frozenset(tokenizer.all_special_ids)
    runner = ModelRunner(loaded.model, pad_token_id or 0, unpenalized)
    grammars = GrammarCompiler(tokenizer, prompts.stop_token_ids)  # warmed up now, not in a request's step
    engine = Engine(runner, prompts, Scheduler(limits), loaded.context_length, grammars)
    ready = protocol.Ready(WorkerServer.make_worker_id(), loaded.names, settings.max_batch, loaded.context_length,
                           limits.max_batch_tokens)
    return engine, ready


def main() -> None:
    settings = load_settings(WorkerSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s worker %(levelname)s %(message)s")
    set_torch_threads(settings.threads)
    engine, ready = build_engine(settings)
    server = WorkerServer(engine, ready, settings.broker, settings.heartbeat_interval, curve=settings.curve())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stopping.set())
    server.run()


if __name__ == "__main__":
    main()
