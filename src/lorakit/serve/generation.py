"""The generation routes of `lorakit serve`: /v1/completions and /v1/chat/completions (both stream with SSE), and
vLLM's /tokenize and /detokenize.

Handlers validate and tokenize, hand the request to the engine thread as one row per choice of each prompt, and
read the rows' events back from an asyncio queue the engine feeds (`loop.call_soon_threadsafe`;
`lorakit.serve.inflight`). A client that goes away cancels its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lorakit.data.toolcalls import renders_tools
from lorakit.serve import protocol as P
from lorakit.serve import responses as R
from lorakit.serve.adapters import AdapterRoutes
from lorakit.serve.engine import Engine
from lorakit.serve.inflight import Run, collect, sse_response, unless_gone, usage
from lorakit.serve.metrics import Latency
from lorakit.serve.requests import Delta, Done, Event, Failed, GenRequest, Prompt, TokenLogprob
from lorakit.serve.tools import ToolStream, with_tools

log = logging.getLogger(__name__)


class GenerationRoutes:
    def __init__(self, engine: Engine, adapters: AdapterRoutes, max_waiting: int = 1024) -> None:
        self.engine, self.adapters, self.tok = engine, adapters, engine.tokenizer
        self.latency = Latency()
        self.max_waiting = max_waiting

    async def completions(self, request: Request) -> Response:
        parsed = P.parse_completion(await P.read_json(request))
        run = await self._start(parsed, request, "completions")
        rid = R.new_id("cmpl")
        wanted, token_text = parsed.params["logprobs"] is not None, self.engine.token_text
        echoed = None
        if parsed.echo:  # each prompt's text, which its choices start with
            firsts = run.reqs[:: run.width]
            echoed = await asyncio.to_thread(
                lambda: [
                    self._prompt_text(p, r.prompt_ids) for p, r in zip(parsed.prompts, firsts, strict=True)
                ]
            )
        if parsed.stream:  # (best_of = n here: row i is choice i)
            offsets = [0] * len(run.reqs)  # text_offset continues across chunks, per choice

            def chunk(i: int, text: str, finish: str | None, entries: tuple[TokenLogprob, ...] = ()) -> dict:
                lps = R.completion_logprobs(entries, token_text, offsets[i]) if wanted else None
                offsets[i] += sum(len(t) for t in lps["tokens"]) if lps else 0
                return R.completion_body(rid, run.model, [R.completion_choice(i, text, finish, lps)], None)

            stream = self._stream(run, rid, chunk, parsed.include_usage, chat=False, echoed=echoed)
            return sse_response(stream)
        results = await unless_gone(request, run.reqs, collect(run))
        choices = []
        for p in range(len(results) // run.width):  # choices of prompt p: indices p*n to p*n + n - 1
            rows = results[p * run.width : (p + 1) * run.width]
            picked = range(parsed.n)
            if run.width > parsed.n:
                sums = [done.logprob_sum or 0.0 for _, done, _ in rows]
                picked = R.best(sums, [done.completion_tokens for _, done, _ in rows], parsed.n)
            for k in picked:
                text, done, entries = rows[k]
                lps = R.completion_logprobs(entries, token_text) if wanted else None
                head = echoed[p] if echoed else ""
                choices.append(R.completion_choice(len(choices), head + text, done.finish_reason, lps))
        self._observe_total(run)
        return JSONResponse(R.completion_body(rid, run.model, choices, usage(results, run.width)))

    def _prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """What `echo` puts first: the prompt as given, or its token ids' text."""
        if isinstance(prompt, str):
            return prompt
        with self.engine.tokenizer_lock:
            return self.tok.decode(ids)

    async def chat_completions(self, request: Request) -> Response:
        body = await P.read_json(request)
        parsed = P.parse_chat(body)
        parsed.tools = tools = with_tools(parsed, body)
        run = await self._start(parsed, request, "chat")
        rid = R.new_id("chatcmpl")
        wanted, token_text = parsed.params["logprobs"] is not None, self.engine.token_text
        if parsed.stream:
            held = [ToolStream(tools) if tools is not None and tools.active else None for _ in run.reqs]

            def chunk(i: int, text: str, finish: str | None, entries: tuple[TokenLogprob, ...] = ()) -> list:
                lps = R.chat_logprobs(entries, token_text) if wanted and entries else None
                if held[i] is None:
                    delta = {"content": text} if text or not finish else {}
                    return [R.chat_chunk(rid, run.model, delta, finish, lps, i)]
                out = []  # with tools: content once it cannot be a call; calls at the end
                text = held[i].feed(text)
                calls = []
                if finish is not None:
                    rest, calls = held[i].finish()
                    text += rest
                if text:
                    out.append(R.chat_chunk(rid, run.model, {"content": text}, None, None, i))
                if calls:
                    delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                    out.append(R.chat_chunk(rid, run.model, delta, None, None, i))
                if finish is not None:
                    reason = "tool_calls" if calls and finish == "stop" else finish
                    out.append(R.chat_chunk(rid, run.model, {}, reason, None, i))
                return out

            return sse_response(self._stream(run, rid, chunk, parsed.include_usage, chat=True))
        results = await unless_gone(request, run.reqs, collect(run))
        choices = []
        for i, (text, done, entries) in enumerate(results):
            calls = tools.calls_of(text) if tools is not None and done.finish_reason == "stop" else []
            lps = R.chat_logprobs(entries, token_text) if wanted else None
            choices.append(R.chat_choice(i, text, done.finish_reason, lps, calls))
        self._observe_total(run)
        return JSONResponse(R.chat_body(rid, run.model, choices, usage(results, run.width)))

    def _observe_total(self, run: Run) -> None:
        self.latency.observe(run.endpoint, "total", time.monotonic() - run.started)

    async def tokenize(self, request: Request) -> dict:
        """vLLM's /tokenize: the token ids a prompt (or chat messages) becomes here, as generation encodes it."""
        parsed = P.parse_tokenize(await P.read_json(request))
        self.adapters.adapter_for(parsed.model)  # 404 for an unknown model, as generation answers

        def encode() -> list[int]:
            tok = self.tok
            with self.engine.tokenizer_lock:
                if parsed.messages is None:
                    add = parsed.params["add_special_tokens"]
                    return tok(parsed.prompts[0], add_special_tokens=add)["input_ids"]
                return self._chat_ids(parsed, parsed.params["add_generation_prompt"], "send 'prompt'")

        ids = await asyncio.to_thread(encode)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    async def detokenize(self, request: Request) -> dict:
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text} (special tokens kept)."""
        body = await P.read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise P.bad("'tokens' must be a list of token ids", "tokens")
        self.adapters.adapter_for(P.model_of(body))  # 404 for an unknown model
        wrong = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if wrong:
            raise P.bad(f"token ids out of range [0, {self.engine.vocab_size}): {wrong[:5]}", "tokens")

        def decode() -> str:
            with self.engine.tokenizer_lock:
                return self.tok.decode(ids)

        return {"prompt": await asyncio.to_thread(decode)}

    async def _start(self, parsed: P.Parsed, request: Request, endpoint: str) -> Run:
        """Submit the request (a row per choice of each prompt) and wait for its first event, so that early
        failures get their own status.

        Its adapter is held from here (loaded first with --load-on-demand), each row's hold handed to the engine.
        A client that disconnects meanwhile cancels it (it may still be queued behind a full batch)."""
        started = time.monotonic()
        adapter, hold = await self.adapters.resolve(parsed.model)
        with hold:  # until each row holds the adapter itself
            if adapter is not None and self.engine.bank.head(adapter) is not None:
                raise P.bad(
                    f"the model {adapter!r} is a classifier's adapter (a reward model's, a classifier's or a token "
                    "classifier's): it scores texts at /v1/classify and does not generate",
                    "model",
                )
            if adapter is not None and self.engine.bank.pooling(adapter) is not None:
                raise P.bad(
                    f"the model {adapter!r} is an embedding model's adapter: it embeds texts at /v1/embeddings and "
                    "does not generate",
                    "model",
                )
            # long prompts must not stall the event loop
            prompts = await asyncio.to_thread(self._encode, parsed)
            batch = len(prompts) > 1
            rows = [
                (ids, params)
                for k, ids in enumerate(prompts)
                for params in P.choice_params(parsed, self._budget(parsed, len(ids), k if batch else None))
            ]
            wrong = [t for t, _ in rows[0][1].logit_bias if t >= self.engine.vocab_size]
            if wrong:
                vocab = self.engine.vocab_size
                raise P.bad(f"logit_bias: token ids out of range [0, {vocab}): {wrong[:5]}", "logit_bias")
            if not self.engine.alive:
                raise P.APIError(503, "the engine is not running", "server_error")
            self._room_for(len(rows))
            leases = self.adapters.leases(adapter, len(rows))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(row: int) -> Callable[[Event], None]:
            def emit(event: Event) -> None:  # called on the engine thread
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                    loop.call_soon_threadsafe(events.put_nowait, (row, event))

            return emit

        reqs = [
            GenRequest(ids, adapter, p, emitter(i), lease=lease, slot=slot)
            for i, ((ids, p), (lease, slot)) in enumerate(zip(rows, leases, strict=True))
        ]
        for req in reqs:  # submitted together: the rows of one prompt share its prefill (the engine's rule)
            self.engine.submit(req)  # (the engine owns each row's hold from here)
        first = await unless_gone(request, reqs, events.get())
        if isinstance(first[1], Failed):
            for req in reqs:
                req.cancelled = True
            raise P.APIError(first[1].status, first[1].message, first[1].code)
        self.latency.observe(endpoint, "first_event", time.monotonic() - started)
        width = len(reqs) // len(prompts)
        model = parsed.model or self.adapters.base_name
        return Run(reqs, events, first, model, width, endpoint, started)

    def _room_for(self, rows: int) -> None:
        """400 if `rows` sequences could never fit (the batch plus the queue), 503 if they do not fit now: the
        queue is bounded, so a flood of requests costs memory for at most `max_waiting` of them."""
        capacity = self.engine.config.max_batch + self.max_waiting
        if rows > capacity:
            raise P.bad(
                f"this request needs {rows} sequences; this server takes at most {capacity} at once "
                f"(--max-batch {self.engine.config.max_batch} + --max-waiting {self.max_waiting})",
                "n",
            )
        load = self.engine.load()
        if load["running"] + load["waiting"] + rows > capacity:
            raise P.APIError(
                503,
                f"the server is busy: {load['running']} sequences running and {load['waiting']} waiting "
                f"(--max-waiting {self.max_waiting}); retry later",
                "server_overloaded",
            )

    def _encode(self, parsed: P.Parsed) -> list[list[int]]:
        """Each prompt's token ids: chat messages through the chat template, text as is, or the ids given."""
        tok = self.tok
        with self.engine.tokenizer_lock:
            if parsed.messages is not None:
                ids = self._chat_ids(parsed, True, "use /v1/completions")
                if not ids:
                    raise P.bad("the prompt is empty", "messages")
                return [ids]
            out = []
            for k, prompt in enumerate(parsed.prompts or []):
                where = f"prompt[{k}]" if len(parsed.prompts) > 1 else "prompt"
                if isinstance(prompt, str):
                    ids = tok(prompt, add_special_tokens=True)["input_ids"]
                else:
                    ids = list(prompt)
                    wrong = [t for t in ids if not 0 <= t < self.engine.vocab_size]
                    if wrong:
                        raise P.bad(
                            f"{where}: token ids out of range [0, {self.engine.vocab_size}): {wrong[:5]}",
                            "prompt",
                        )
                if not ids:
                    raise P.bad(f"{where} is empty", "prompt")
                out.append(ids)
        return out

    def _chat_ids(self, parsed: P.Parsed, add_generation_prompt: bool, instead: str) -> list[int]:
        """The chat messages' token ids through the chat template (with the request's tools, if any); 400 naming
        what to do `instead` when the model has no template. Called with the tokenizer lock held."""
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            raise P.bad(f"this model has no chat template; {instead}", "messages")
        messages, extra = parsed.messages, {}
        if parsed.tools is not None:
            native = renders_tools(tok)  # remembered per template
            messages = parsed.tools.prompt(messages, native)
            if native and parsed.tools.tools:
                extra = {"tools": parsed.tools.specs()}
        try:
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
        except Exception as e:  # noqa: BLE001 - the template rejects these messages (jinja errors)
            raise P.bad(f"the chat template rejects these messages: {e}", "messages") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def _budget(self, parsed: P.Parsed, n_prompt: int, which: int | None = None) -> int:
        """max_tokens for a prompt (`which` of a batch); 400 if prompt + max_tokens exceed the context length."""
        limit, want = self.engine.max_model_len, parsed.max_tokens
        if want is None and n_prompt < limit:
            return limit - n_prompt
        if want is None or n_prompt + want > limit:
            where = "" if which is None else f"prompt[{which}]: "
            raise P.APIError(
                400,
                f"{where}this model's maximum context length is {limit} tokens; you requested "
                f"{n_prompt + (want or 0)} tokens ({n_prompt} in the prompt, {want or 0} for the completion): "
                "shorten the prompt or max_tokens",
                "context_length_exceeded",
                "messages" if parsed.messages is not None else "prompt",
            )
        return want

    async def _stream(
        self,
        run: Run,
        rid: str,
        chunk: Callable[..., dict],
        include_usage: bool,
        *,
        chat: bool,
        echoed: list[str] | None = None,
    ) -> AsyncIterator[str]:
        dones: dict[int, Done] = {}
        try:
            for i in range(len(run.reqs)):
                if chat:
                    yield R.sse(
                        R.chat_chunk(rid, run.model, {"role": "assistant", "content": ""}, None, index=i)
                    )
                elif echoed is not None and run.reqs[i].params.prompt_logprobs is None:
                    yield R.sse(
                        chunk(i, echoed[i // run.width], None)
                    )  # with logprobs, the Prompt event does
            async for i, event in run.events_until_done():
                if isinstance(event, Prompt):
                    bodies = chunk(i, echoed[i // run.width] if echoed else "", None, event.logprobs)
                elif isinstance(event, Delta):
                    bodies = chunk(i, event.text, None, event.logprobs)
                elif isinstance(event, Done):
                    bodies = chunk(i, "", event.finish_reason)
                    dones[i] = event
                else:
                    bodies = None
                if bodies is not None:
                    for b in bodies if isinstance(bodies, list) else [bodies]:  # (chat: a list, maybe empty)
                        yield R.sse(b)
                    continue
                # a Failed event: the openai client raises APIError on an "error" event
                yield R.sse(P.APIError(event.status, event.message, event.code).body())
            if include_usage and len(dones) == len(run.reqs):
                use = usage([(None, dones[i], None) for i in range(len(run.reqs))], run.width)
                yield R.sse(R.usage_chunk(rid, run.model, chat, use))
            yield "data: [DONE]\n\n"
            self._observe_total(run)
        finally:
            run.cancel()  # done (no-op), or the client went away: the rows leave the batch
