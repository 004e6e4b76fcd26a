"""llama.cpp backend: a small quantized language model scoring a window in one evaluation.

Needs the ``llm`` extra (llama-cpp-python); without it the registry raises
``BackendUnavailable`` with the install command, and nothing else imports this
module. How a reading is scored, with no text generation:

1. At load the pack's fixed ``[llama].prefix`` is tokenized and decoded once;
   its keys and values stay in the context's KV cache (sequence 0).
2. Per reading the window is turned into a short text by the pack's
   ``[llama].encoding`` (``WindowEncoding`` below: 7 to 9 tokens).
3. The cache is cut back to the prefix (``llama_memory_seq_rm``) and only that
   suffix is decoded: all but its last token with embeddings off and no
   output, then the last token alone with embeddings on, so the model's output
   layer runs for one token only.
4. The last token's hidden state (after the final norm, ``n_embd`` floats) goes
   through the pack's fitted linear head ``[llama].head``, a float32 ``.npy``
   of shape ``[n_embd + 1, labels]`` (rows ``0..n_embd-1`` the weights, the
   last row the bias), and ``softmax(logits / T)`` with the temperature ``T``
   of ``[calibration]`` gives the calibrated probabilities.

With flash attention on and ``n_ubatch`` at most 48 (the manifest refuses
more), the cached-prefix result is bit-identical to a full evaluation of
prefix plus suffix in one batch (``LlamaRunner.hidden_uncached``; the
integration tests compare them). With flash attention off it is not: the
attention of the last token, decoded alone, runs through another kernel.

Threads: llama.cpp uses ``[llama].threads`` of the pack (default 2); the
``model.intra_op_threads`` setting is ONNX Runtime's and does not apply here.
One backend instance owns one llama.cpp context and serialises its calls; a
second scoring thread needs its own backend. llama.cpp's threads synchronise
through OpenMP, which spins by default: fastest on an idle device, ruinous in
the tail when other processes compete for the cores, where
``OMP_WAIT_POLICY=PASSIVE`` in the environment (read once, when llama.cpp is
loaded) trades half the speed for a bounded tail (numbers in docs/backends.md).

``ood_score`` is how far (in encoding levels) the window's statistics fall
outside the scale the text encoding can express (0 inside it): the language
model cannot tell such a window from the nearest value on the scale, so the
pack's ``routing.feature_z_max`` sends it to the cloud.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from edge_agent.errors import ModelLoadError
from edge_agent.models.pack import LlamaSpec, ModelPack
from edge_agent.scoring.backends.base import BackendOptions, BackendOutput, FloatArray

log = logging.getLogger(__name__)

_SEQ = 0
_MAX_TOKENS_PER_TEXT = 512


# ----------------------------------------------------------------------------- text encodings


@dataclass(frozen=True, slots=True)
class WindowEncoding:
    """Turns a [channels, samples] window into a compact text for the language model.

    Each channel's standard deviation becomes one digit on a log2 scale,
    ``level = round(log2(std / base))`` clipped to 0..9, so a factor of two in
    movement energy is one step; the digits are grouped as ``groups`` says (the
    accelerometer's three axes, then the gyroscope's), e.g. ``" 665 546"``. Every token
    costs ~4 ms on the 2-core dev machine, so encodings stay short.
    """

    name: str
    base: float
    groups: tuple[int, ...]
    lead: str = " "
    sep: str = " "
    end: str = ""

    def levels(self, window: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Unclipped, unrounded level per channel (the value behind each digit).

        Computed from the float32 values the runtime receives, so a script fitting a head
        on float64 data gets exactly the digits the backend will produce.
        """
        std = np.asarray(window, dtype=np.float32).astype(np.float64).std(axis=-1)
        return np.asarray(np.log2(np.maximum(std, 1e-12) / self.base), dtype=np.float64)

    def text(self, window: npt.NDArray[Any]) -> str:
        digits = np.clip(np.rint(self.levels(window)), 0, 9).astype(np.int64).tolist()
        parts, start = [], 0
        for size in self.groups:
            parts.append("".join(str(d) for d in digits[start : start + size]))
            start += size
        return self.lead + self.sep.join(parts) + self.end

    def off_scale(self, windows: npt.NDArray[Any]) -> FloatArray:
        """[N]: levels beyond the encodable 0..9 (rounding included), 0 when all fit."""
        lv = self.levels(windows)
        below = np.maximum(-0.5 - lv, 0.0)
        above = np.maximum(lv - 9.5, 0.0)
        return np.asarray(np.maximum(below, above).max(axis=-1), dtype=np.float32)


#: Encodings a pack may name in ``[llama].encoding``; a name is never reused for another rule.
ENCODINGS: dict[str, WindowEncoding] = {
    e.name: e
    for e in (
        # " 665 546": 8 tokens with SmolLM2's tokenizer (every digit is a token)
        WindowEncoding(name="std-log2-digits-v1", base=0.05, groups=(3, 3)),
        # " 665 546\n": 9 tokens
        WindowEncoding(name="std-log2-digits-nl-v1", base=0.05, groups=(3, 3), end="\n"),
        # "665546\n": 7 tokens
        WindowEncoding(
            name="std-log2-compact-nl-v1", base=0.05, groups=(6,), lead="", sep="", end="\n"
        ),
        # "665546": 6 tokens
        WindowEncoding(name="std-log2-compact-v1", base=0.05, groups=(6,), lead="", sep=""),
    )
}


# ----------------------------------------------------------------------------- llama.cpp


#: ggml log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continuation. llama.cpp's
#: warnings at load are about capacity this backend does not ask for (a context shorter than
#: the model's, no pooling), so they are logged at INFO; errors at ERROR.
_LOG_LEVELS = {3: logging.INFO, 4: logging.ERROR}


def _forward_log(level: int, text: bytes | None, user_data: int | None) -> None:
    """llama.cpp's own log lines go to this module's logger instead of raw stderr."""
    py_level = _LOG_LEVELS.get(level, logging.DEBUG)
    if text and log.isEnabledFor(py_level):
        log.log(py_level, "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


#: The C callback; kept referenced for the life of the process, as llama.cpp may call it anytime.
_LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_log)


class LlamaRunner:
    """One llama.cpp model + context with a fixed prefix kept in the KV cache.

    ``hidden(text)`` evaluates only ``text`` after the cached prefix and returns the
    last token's hidden state; ``hidden_uncached(text)`` evaluates prefix and text
    from an empty cache in one pass, as the reference the cached path must equal.
    Not thread-safe: the backend serialises calls.
    """

    def __init__(
        self,
        model_path: Path,
        prefix: str,
        *,
        add_bos: bool = False,
        n_ctx: int = 128,
        n_ubatch: int = 32,
        threads: int = 2,
        extra_buffers: bool = False,
    ) -> None:
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # Extra buffer types repack weights (AMX on recent Xeons). On the 2-core dev VM the AMX
        # path segfaults in the first decode of more than one token (ggml-org/llama.cpp#20824).
        mparams.use_extra_bufts = extra_buffers
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"{model_path}: llama.cpp could not load the model")
        self._model = model
        try:
            self._setup(
                prefix,
                add_bos=add_bos,
                n_ctx=n_ctx,
                n_ubatch=n_ubatch,
                threads=threads,
                path=model_path,
            )
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_pack(cls, pack: ModelPack, spec: LlamaSpec) -> LlamaRunner:
        """The runner a pack's ``[llama]`` table describes."""
        return cls(
            pack.file(spec.model),
            spec.prefix,
            add_bos=spec.add_bos,
            n_ctx=spec.n_ctx,
            n_ubatch=spec.n_ubatch,
            threads=spec.threads,
            extra_buffers=spec.extra_buffers,
        )

    def _setup(
        self, prefix: str, *, add_bos: bool, n_ctx: int, n_ubatch: int, threads: int, path: Path
    ) -> None:
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = False
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        # Flash attention on: its CPU kernel treats each query row alike whatever the batch, so
        # a token decoded alone gets the same hidden state as inside a batch. With it off the
        # attention of a single token runs through another kernel and differs (measured).
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ModelLoadError(f"{path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self._ctx = ctx
        # llama.cpp may round the context up; one decode call takes at most n_batch tokens.
        self.n_ctx = min(int(llama_cpp.llama_n_ctx(ctx)), n_ctx)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.prefix_tokens = self.tokenize(prefix, add_special=add_bos)
        if not self.prefix_tokens:
            raise ModelLoadError(f"{path}: the prompt prefix is empty after tokenization")
        if len(self.prefix_tokens) >= self.n_ctx:
            raise ModelLoadError(
                f"{path}: the prefix takes {len(self.prefix_tokens)} tokens, n_ctx is {self.n_ctx}"
            )
        self._decode_prefix()

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        buf = (llama_cpp.llama_token * _MAX_TOKENS_PER_TEXT)()
        n = llama_cpp.llama_tokenize(
            self._vocab, raw, len(raw), buf, _MAX_TOKENS_PER_TEXT, add_special, False
        )
        if n < 0:
            raise ModelLoadError(f"text of {len(raw)} bytes is over {_MAX_TOKENS_PER_TEXT} tokens")
        return [int(t) for t in buf[:n]]

    def hidden(self, text: str) -> FloatArray:
        """Hidden state of the last token of ``text`` decoded after the cached prefix."""
        tokens = self._suffix_tokens(text)
        p = len(self.prefix_tokens)
        if not llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, p, -1):
            raise ModelLoadError("llama.cpp could not cut the KV cache back to the prefix")
        if len(tokens) > 1:
            self._decode(tokens[:-1], p, output_last=False)
        return self._decode(tokens[-1:], p + len(tokens) - 1, output_last=True)

    def hidden_uncached(self, text: str) -> FloatArray:
        """The same hidden state from an empty cache, prefix and text in one decode call.

        Leaves the prefix (only) in the cache again, so ``hidden`` keeps working.
        """
        tokens = self.prefix_tokens + self._suffix_tokens(text)
        llama_cpp.llama_memory_clear(self._mem, True)
        try:
            # With embeddings on every token of the batch is an output; take the last one.
            return self._decode(tokens, 0, output_last=True, embeddings_all=True)
        finally:
            llama_cpp.llama_memory_clear(self._mem, True)
            self._decode_prefix()

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def _suffix_tokens(self, text: str) -> list[int]:
        tokens = self.tokenize(text)
        if not tokens:
            raise ModelLoadError("the text encoding of the window is empty")
        if len(self.prefix_tokens) + len(tokens) > self.n_ctx:
            raise ModelLoadError(
                f"prefix + window text take {len(self.prefix_tokens) + len(tokens)} tokens,"
                f" over the context of {self.n_ctx}"
            )
        return tokens

    def _decode_prefix(self) -> None:
        self._decode(self.prefix_tokens, 0, output_last=False)

    def _decode(
        self, tokens: list[int], pos0: int, *, output_last: bool, embeddings_all: bool = False
    ) -> FloatArray:
        if self._ctx is None:
            raise ModelLoadError("the llama.cpp backend was used before load() or after close()")
        batch = self._batch
        n = len(tokens)
        batch.n_tokens = n
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = _SEQ
            batch.logits[i] = 0
        if output_last:
            batch.logits[n - 1] = 1
        want_embeddings = output_last or embeddings_all
        llama_cpp.llama_set_embeddings(self._ctx, want_embeddings)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise ModelLoadError(f"llama_decode failed with code {rc} ({n} tokens at {pos0})")
        if not output_last:
            return np.empty(0, dtype=np.float32)
        ptr = llama_cpp.llama_get_embeddings_ith(self._ctx, -1)
        if not ptr:
            raise ModelLoadError("llama.cpp returned no hidden state for the last token")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32, copy=True)


# ----------------------------------------------------------------------------- quantizer

#: Weight types ``[fetch].requantize`` may name, as llama.cpp's file types.
QUANT_TYPES = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
#: Threads of the quantizer: fixed, so that its output never depends on the machine's cores.
_QUANT_THREADS = 1


def quantize_gguf(source: Path, target: Path, kind: str) -> None:
    """Convert a GGUF to another weight type with llama.cpp's own quantizer.

    ``allow_requantize``: the source may itself be quantized (it is dequantized first).
    Raises ``ModelLoadError`` when llama.cpp fails.
    """
    ftype = QUANT_TYPES.get(kind)
    if ftype is None:
        raise ModelLoadError(f"unknown weight type {kind!r} (known: {', '.join(QUANT_TYPES)})")
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = _QUANT_THREADS
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise ModelLoadError(f"{source}: llama.cpp could not requantize it to {kind} (code {rc})")


# ----------------------------------------------------------------------------- backend


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(self) -> None:
        self._runner: LlamaRunner | None = None
        self._encoding: WindowEncoding | None = None
        self._weight = np.zeros((0, 0), dtype=np.float64)
        self._bias = np.zeros(0, dtype=np.float64)
        self._temperature = 1.0
        self._lock = threading.Lock()

    def load(self, pack: ModelPack, options: BackendOptions) -> None:
        m = pack.manifest
        spec: LlamaSpec | None = m.llama
        if spec is None:
            raise ModelLoadError(f"{pack.path}: a llama_cpp pack needs a [llama] table")
        encoding = ENCODINGS.get(spec.encoding)
        if encoding is None:
            known = ", ".join(sorted(ENCODINGS))
            raise ModelLoadError(
                f"{pack.path}: unknown llama.encoding {spec.encoding!r} (known: {known})"
            )
        if m.input.shape != [sum(encoding.groups), *m.input.shape[1:]] or len(m.input.shape) != 2:
            raise ModelLoadError(
                f"{pack.path}: encoding {encoding.name} needs input [{sum(encoding.groups)},"
                f" samples], the manifest says {m.input.shape}"
            )
        head = _load_head(pack.file(spec.head), len(m.labels))
        temperature = m.calibration.temperature if m.calibration is not None else 1.0
        if not temperature > 0:
            raise ModelLoadError(f"{pack.path}: calibration.temperature must be positive")
        runner = LlamaRunner.for_pack(pack, spec)
        if head.shape[0] != runner.n_embd + 1:
            runner.close()
            raise ModelLoadError(
                f"{pack.file(spec.head)}: head has {head.shape[0] - 1} inputs,"
                f" the model's hidden state has {runner.n_embd}"
            )
        self.close()
        self._runner = runner
        self._encoding = encoding
        # The head is applied in float64: 576 x labels is cheap, and rounding stays far below
        # what float32 probabilities can show.
        self._weight = np.ascontiguousarray(head[:-1], dtype=np.float64)
        self._bias = np.ascontiguousarray(head[-1], dtype=np.float64)
        self._temperature = float(temperature)
        # Warm-up: one real evaluation, checked, before the pack is reported ready.
        out = self.score(np.ones(tuple(m.input.shape), dtype=np.float32))
        if out.probs.shape != (1, len(m.labels)) or not np.isfinite(out.probs).all():
            self.close()
            raise ModelLoadError(f"{pack.path}: warm-up gave no valid probabilities")
        log.debug(
            "loaded %s: prefix %d tokens, %d threads (model.intra_op_threads=%d is for ONNX)",
            pack.ref,
            len(runner.prefix_tokens),
            spec.threads,
            options.intra_op_threads,
        )

    def hidden(self, windows: FloatArray, *, cached: bool = True) -> FloatArray:
        """[N, n_embd] last-token hidden states (``cached=False``: full evaluations)."""
        with self._lock:
            runner, encoding = self._runner, self._encoding
            if runner is None or encoding is None:
                raise ModelLoadError(
                    "the llama.cpp backend was used before load() or after close()"
                )
            run = runner.hidden if cached else runner.hidden_uncached
            return np.stack([run(encoding.text(w)) for w in windows])

    def score(self, window: FloatArray) -> BackendOutput:
        return self.score_batch(window[np.newaxis])

    def score_batch(self, windows: FloatArray) -> BackendOutput:
        # Batching readings as parallel sequences saves only ~10% on 2 cores: one at a time.
        h = self.hidden(windows).astype(np.float64)
        logits = (h @ self._weight + self._bias) / self._temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        encoding = self._encoding
        ood = encoding.off_scale(windows) if encoding is not None else None
        return BackendOutput(probs=probs, ood_score=ood)

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                self._runner.close()
            self._runner = None


def _load_head(path: Path, n_labels: int) -> FloatArray:
    try:
        head = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .npy head: {exc}") from exc
    if head.dtype != np.float32 or head.ndim != 2 or head.shape[1] != n_labels:
        raise ModelLoadError(
            f"{path}: head must be float32 [n_embd + 1, {n_labels}], got {head.dtype} {head.shape}"
        )
    if not np.isfinite(head).all():
        raise ModelLoadError(f"{path}: head holds non-finite values")
    return np.asarray(head, dtype=np.float32)
