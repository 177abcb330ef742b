"""python -m worker: serve a model on the tokenbus."""

from worker.threads import prepare_openmp_environment, set_torch_threads

prepare_openmp_environment()  # OpenMP reads it once, when torch loads: before the imports below

import logging
import signal
import time

from transformers import PreTrainedTokenizerBase

from broker import protocol
from broker.settings import load_settings
from worker.config import WorkerSettings
from worker.embedder import Embedder
from worker.embedding_source import is_sentence_transformers_folder, resolve_embedding_model
from worker.engine import Engine
from worker.grammar import GrammarCompiler
from worker.loader import load_model, pick_device
from worker.prefix_cache import BLOCK_SIZE, PrefixStore
from worker.prompt import PromptEncoder
from worker.runner import ModelRunner
from worker.scheduler import Scheduler, SchedulerLimits
from worker.server import WorkerServer
from worker.threads import StepThreads


def build_engine(settings: WorkerSettings) -> tuple[Engine, protocol.Ready]:
    loaded = load_model(settings)
    tokenizer = loaded.tokenizer
    if settings.chat_template is not None:
        tokenizer.chat_template = settings.chat_template.read_text()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limits = SchedulerLimits(
        max_batch=settings.max_batch,
        max_batch_tokens=settings.max_batch_tokens or settings.max_batch * loaded.context_length,
        # About half a second of prefill on a CPU: running streams pause no longer than that.
        max_prefill_tokens=settings.max_prefill_tokens or (4096 if loaded.model.device.type == "cuda" else 512),
    )
    prompts = PromptEncoder(tokenizer, loaded.model.generation_config.eos_token_id)
    logging.getLogger(__name__).info("tool calls in the %s format", prompts.tool_format.name)
    unpenalized = prompts.stop_token_ids | frozenset(tokenizer.all_special_ids)
    prefixes = PrefixStore(max(settings.prefix_cache_tokens, BLOCK_SIZE)) if settings.prefix_cache_tokens else None
    threads = StepThreads(settings.threads) if loaded.model.device.type == "cpu" else None
    runner = ModelRunner(loaded.model, pad_token_id or 0, unpenalized, prefixes, threads)
    if settings.compile_decode and loaded.model.device.type == "cpu":
        started = time.monotonic()
        if runner.compile_decode(settings.max_batch):
            logging.getLogger(__name__).info("decode steps compiled in %.0f s", time.monotonic() - started)
    engine = Engine(runner, prompts, Scheduler(limits), loaded.context_length, grammar_compiler(tokenizer, prompts))
    ready = protocol.Ready(WorkerServer.make_worker_id(), loaded.names, settings.max_batch, loaded.context_length,
                           limits.max_batch_tokens, prefixes.budget if prefixes else 0)
    return engine, ready


def grammar_compiler(tokenizer: PreTrainedTokenizerBase, prompts: PromptEncoder) -> GrammarCompiler | None:
    """Built and warmed up now, not in a request's step; None when the tokenizer cannot have one
    (the model serves on, and a constrained request is told why it cannot be)."""
    try:
        return GrammarCompiler(tokenizer, prompts.stop_token_ids)
    except ValueError as exc:
        logging.getLogger(__name__).warning("no constrained decoding for this model: %s", exc)
        return None


def build_embedder(settings: WorkerSettings) -> tuple[Embedder, protocol.Ready]:
    import torch

    from worker.embedding_runner import EmbeddingRunner  # imports sentence-transformers: embedding workers only

    source = resolve_embedding_model(settings.model, settings.cache_dir)
    # float32 unless asked otherwise: vectors are compared across servers and runs, and the model is small.
    dtype = torch.float32 if settings.dtype == "auto" else getattr(torch, settings.dtype)
    device = pick_device(settings.device)
    runner = EmbeddingRunner.load(source.location, device, dtype)
    names = tuple(settings.model_names) or (source.default_name,)
    # Passes of a fraction of a second on a CPU: answers leave pass by pass while later requests
    # arrive, instead of every request waiting for one huge pass and the worker then waiting for them.
    max_pass_tokens = settings.max_batch_tokens or (16384 if device.type == "cuda" else 2048)
    embedder = Embedder(runner, names[0], max_pass_tokens, settings.shorten_embeddings)
    ready = protocol.Ready(WorkerServer.make_worker_id(), names, settings.max_batch, runner.max_length,
                           max_pass_tokens, tasks=(protocol.Task.EMBED,))
    return embedder, ready


def serves_embeddings(settings: WorkerSettings) -> bool:
    if settings.task == "auto":
        return is_sentence_transformers_folder(settings.model)
    return settings.task == "embed"


def main() -> None:
    settings = load_settings(WorkerSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s worker %(levelname)s %(message)s")
    set_torch_threads(settings.threads)
    engine, ready = build_embedder(settings) if serves_embeddings(settings) else build_engine(settings)
    server = WorkerServer(engine, ready, settings.broker, settings.heartbeat_interval, curve=settings.curve(),
                          drain_timeout=settings.drain_timeout)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.run()


if __name__ == "__main__":
    main()
