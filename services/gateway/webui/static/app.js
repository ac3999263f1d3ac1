// chatfleet web UI: chat, side by side, arena and leaderboard on the gateway's own API.
// Plain browser JavaScript, no build step. Replies are Markdown, rendered by marked and always
// sanitised by DOMPurify before they touch the page.
"use strict";

(() => {
  const KEY_STORAGE = "chatfleet.apiKey";
  const $ = (id) => document.getElementById(id);

  // --- the API ----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code || null;
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    return headers;
  }

  async function errorOf(response) {
    let message = `HTTP ${response.status}`;
    let code = null;
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || message;
      code = body.error && body.error.code;
    } catch (_) {
      // Not JSON: keep the status line.
    }
    if (response.status === 401) keyDialog.open(apiKey() ? "That key was refused." : "");
    return new ApiError(response.status, message, code);
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    const response = await fetch(path, {
      method,
      headers: requestHeaders(),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  // The `data:` payloads of a server-sent event stream, parsed, until [DONE].
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event
            .split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).trimStart())
            .join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // Text pieces, the finish reason and usage of a streamed chat completion.
  async function* streamChat(path, body, signal) {
    const response = await api(path, { method: "POST", body, signal });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.code);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) yield { text: choice.delta.content };
      if (choice && choice.finish_reason) yield { finish: choice.finish_reason };
      if (chunk.usage) yield { usage: chunk.usage };
    }
  }

  function sampling() {
    const maxTokens = parseInt($("max-tokens").value, 10);
    return {
      temperature: parseFloat($("temperature").value),
      top_p: parseFloat($("top-p").value),
      ...(maxTokens > 0 ? { max_tokens: maxTokens } : {}),
    };
  }

  function withSystem(messages) {
    const system = $("system-prompt").value.trim();
    return system ? [{ role: "system", content: system }, ...messages] : messages;
  }

  // A transport sends a conversation and yields what streamChat yields.
  const openAITransport = (modelOf) => (messages, signal) =>
    streamChat(
      "/v1/chat/completions",
      {
        model: modelOf(),
        messages: withSystem(messages),
        stream: true,
        stream_options: { include_usage: true },
        ...sampling(),
      },
      signal,
    );

  // --- Markdown ---------------------------------------------------------------------------

  function setupMarkdown() {
    if (!window.DOMPurify) return;
    // Links open in a new tab and cannot reach back into this one.
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
  }

  function renderMarkdown(element, text) {
    if (window.marked && window.DOMPurify) {
      const html = window.marked.parse(text, { gfm: true, breaks: true });
      // No images: a reply could embed a URL that leaks the conversation to whoever serves it.
      element.innerHTML = window.DOMPurify.sanitize(html, {
        USE_PROFILES: { html: true },
        FORBID_TAGS: ["img", "style", "form", "input"],
      });
      for (const pre of element.querySelectorAll("pre")) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "copy-code";
        button.textContent = "Copy";
        // marked ends a code block with a newline that nobody wants pasted.
        const code = (pre.querySelector("code") || pre).textContent.replace(/\n$/, "");
        button.addEventListener("click", () => copyText(code, button));
        pre.appendChild(button);
      }
    } else {
      element.textContent = text; // the libraries failed to load: plain text is still safe
    }
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      // No clipboard API outside secure contexts (plain http on another host): the old way.
      const area = document.createElement("textarea");
      area.value = text;
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  }

  // --- a conversation in one column -------------------------------------------------------

  class Conversation {
    constructor(container) {
      this.container = container;
      this.emptyHTML = container.innerHTML;
      this.messages = []; // {role, content}, as sent to the API
    }

    clear() {
      this.messages = [];
      this.container.innerHTML = this.emptyHTML;
    }

    _append(element) {
      const empty = this.container.querySelector(".empty");
      if (empty) empty.remove();
      this.container.appendChild(element);
      this.container.scrollTop = this.container.scrollHeight;
    }

    addUser(text) {
      this.messages.push({ role: "user", content: text });
      const element = document.createElement("div");
      element.className = "message user";
      element.textContent = text;
      this._append(element);
    }

    get lastIsAssistant() {
      return this.messages.length > 0 && this.messages[this.messages.length - 1].role === "assistant";
    }

    // Forget the last answer (to ask again); true when there was one.
    dropLastAnswer() {
      // Failed answers are shown but not in the history: remove every answer after the last question.
      let last = this.container.lastElementChild;
      while (last && last.classList.contains("assistant")) {
        last.remove();
        last = this.container.lastElementChild;
      }
      if (!this.lastIsAssistant) return false;
      this.messages.pop();
      return true;
    }

    // Stream an answer to the conversation so far; resolves once it ends, however it ends.
    async respond(transport, signal) {
      const element = document.createElement("div");
      element.className = "message assistant streaming";
      const body = document.createElement("div");
      body.className = "body";
      const meta = document.createElement("div");
      meta.className = "meta";
      element.append(body, meta);
      this._append(element);

      let text = "";
      let pieces = 0;
      let usage = null;
      let started = null;
      let scheduled = false;
      const stick = () => {
        const c = this.container;
        return c.scrollHeight - c.scrollTop - c.clientHeight < 40;
      };
      const render = () => {
        scheduled = false;
        const atBottom = stick();
        renderMarkdown(body, text);
        if (atBottom) this.container.scrollTop = this.container.scrollHeight;
      };
      let outcome = "done";
      try {
        for await (const event of transport(this.messages.slice(), signal)) {
          if (event.text) {
            started = started || performance.now();
            text += event.text;
            pieces += 1;
            if (!scheduled) {
              scheduled = true;
              requestAnimationFrame(render);
            }
          } else if (event.usage) {
            usage = event.usage;
          } else if (event.finish === "length") {
            outcome = "length";
          }
        }
      } catch (error) {
        if (error.name === "AbortError") {
          outcome = "stopped";
        } else {
          outcome = "error";
          const box = document.createElement("div");
          box.className = "error";
          box.textContent = error.message || String(error);
          element.insertBefore(box, meta);
        }
      }
      element.classList.remove("streaming");
      renderMarkdown(body, text);
      if (text) this.messages.push({ role: "assistant", content: text });
      this._meta(meta, text, usage ? usage.completion_tokens : pieces, started, outcome);
      element.dataset.outcome = outcome;
      return outcome;
    }

    _meta(meta, text, tokens, started, outcome) {
      const parts = [];
      if (tokens) {
        const seconds = started ? (performance.now() - started) / 1000 : 0;
        parts.push(`${tokens} tokens`);
        if (seconds > 0.05 && tokens > 1) parts.push(`${(tokens / seconds).toFixed(1)} tokens/s`);
      }
      if (outcome === "stopped") parts.push("stopped");
      if (outcome === "length") parts.push("cut at max tokens");
      for (const part of parts) {
        const span = document.createElement("span");
        span.textContent = part;
        meta.appendChild(span);
      }
      if (text) {
        const copy = document.createElement("button");
        copy.type = "button";
        copy.textContent = "Copy";
        copy.addEventListener("click", () => copyText(text, copy));
        meta.appendChild(copy);
      }
    }
  }

  // --- running answers, the composer and the stop button ----------------------------------

  const running = new Set(); // AbortControllers of the answers streaming now

  function setBusy() {
    const busy = running.size > 0;
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    refreshButtons();
  }

  // Stream answers in several conversations at once; resolves with their outcomes.
  async function runAll(jobs) {
    const controller = new AbortController();
    running.add(controller);
    setBusy();
    try {
      return await Promise.all(jobs.map(([conversation, transport]) =>
        conversation.respond(transport, controller.signal)));
    } finally {
      running.delete(controller);
      setBusy();
    }
  }

  $("stop").addEventListener("click", () => {
    // Aborting the fetch closes the connection; the gateway then cancels the gRPC call, and the
    // worker frees the request's slot.
    for (const controller of running) controller.abort();
  });

  // --- models -----------------------------------------------------------------------------

  let chatModels = [];

  function fillSelect(select, names, preferred) {
    const previous = select.value;
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    if (names.includes(previous)) select.value = previous;
    else if (preferred && names.includes(preferred)) select.value = preferred;
  }

  async function loadModels() {
    const status = $("server-status");
    try {
      const listed = (await (await api("/v1/models")).json()).data.map((card) => card.id);
      let names = listed;
      try {
        // Which of them chat (the OpenAI list does not say); keep the full list if unsure.
        const info = (await (await api("/api/models")).json()).data;
        const chat = new Set(info.filter((m) => m.supports_chat).map((m) => m.id));
        const filtered = listed.filter((name) => chat.has(name));
        if (filtered.length) names = filtered;
      } catch (_) {
        // An older gateway: offer every model.
      }
      chatModels = names;
      fillSelect($("chat-model"), names);
      fillSelect($("side-model-a"), names, names[0]);
      fillSelect($("side-model-b"), names, names[1] || names[0]);
      status.className = "hint";
      status.textContent = names.length
        ? `${names.length} chat model${names.length === 1 ? "" : "s"} served.`
        : "No chat model is served right now.";
    } catch (error) {
      status.className = "hint bad";
      status.textContent = error.status === 401 ? "An API key is needed." : `Cannot list models: ${error.message}`;
    }
    refreshButtons();
  }

  // --- the API key dialog -----------------------------------------------------------------

  const keyDialog = {
    open(problem) {
      const dialog = $("key-dialog");
      $("key-error").hidden = !problem;
      $("key-error").textContent = problem || "";
      $("key-input").value = "";
      if (!dialog.open) dialog.showModal();
      $("key-input").focus();
    },
  };

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-dialog").close();
    loadModels();
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-button").addEventListener("click", () => keyDialog.open(""));

  // --- chat -------------------------------------------------------------------------------

  const chat = new Conversation($("chat-messages"));
  const chatTransport = openAITransport(() => $("chat-model").value);

  const chatMode = {
    async send(text) {
      chat.addUser(text);
      await runAll([[chat, chatTransport]]);
    },
    canRegenerate: () => chat.messages.length > 0,
    async regenerate() {
      chat.dropLastAnswer();
      if (chat.messages.length) await runAll([[chat, chatTransport]]);
    },
    clear: () => chat.clear(),
  };

  // --- side by side -----------------------------------------------------------------------

  const sides = [new Conversation($("side-messages-a")), new Conversation($("side-messages-b"))];
  const sideTransports = [
    openAITransport(() => $("side-model-a").value),
    openAITransport(() => $("side-model-b").value),
  ];

  const sideMode = {
    async send(text) {
      for (const side of sides) side.addUser(text);
      await runAll(sides.map((side, i) => [side, sideTransports[i]]));
    },
    canRegenerate: () => sides[0].messages.length > 0,
    async regenerate() {
      for (const side of sides) side.dropLastAnswer();
      await runAll(sides.map((side, i) => [side, sideTransports[i]]));
    },
    clear: () => sides.forEach((side) => side.clear()),
  };

  // --- arena ------------------------------------------------------------------------------

  const arenaSides = [new Conversation($("arena-messages-a")), new Conversation($("arena-messages-b"))];
  let battle = null; // {id, self_match, voted, answered}

  const arenaTransport = (side) => (messages, signal) =>
    streamChat(
      `/api/arena/battles/${encodeURIComponent(battle.id)}/completions`,
      { side, messages: withSystem(messages), ...sampling() },
      signal,
    );

  function resetArena() {
    battle = null;
    arenaSides.forEach((side) => side.clear());
    for (const [side, label] of [["a", "Model A"], ["b", "Model B"]]) {
      const badge = $(`arena-name-${side}`);
      badge.textContent = label;
      badge.className = "badge";
    }
    for (const button of document.querySelectorAll("#arena-votes button")) button.classList.remove("chosen");
    $("arena-notice").hidden = true;
    refreshButtons();
  }

  function notice(text) {
    $("arena-notice").textContent = text;
    $("arena-notice").hidden = !text;
  }

  const arenaMode = {
    async send(text) {
      if (!battle || battle.voted) {
        resetArena();
        const started = await (await api("/api/arena/battles", { method: "POST", body: {} })).json();
        battle = { id: started.id, self_match: started.self_match, voted: false, answered: false };
        notice(
          started.self_match
            ? "Only one chat model is served, so it faces itself in this round: the vote is kept but cannot move its rating."
            : "",
        );
      }
      for (const side of arenaSides) side.addUser(text);
      await runAll([[arenaSides[0], arenaTransport("a")], [arenaSides[1], arenaTransport("b")]]);
      battle.answered = true;
      refreshButtons();
    },
    canRegenerate: () => Boolean(battle && !battle.voted && arenaSides[0].messages.length),
    async regenerate() {
      for (const side of arenaSides) side.dropLastAnswer();
      await runAll([[arenaSides[0], arenaTransport("a")], [arenaSides[1], arenaTransport("b")]]);
    },
    clear: resetArena,
  };

  async function vote(winner, button) {
    if (!battle || battle.voted) return;
    try {
      const result = await (
        await api("/api/arena/votes", { method: "POST", body: { battle_id: battle.id, winner } })
      ).json();
      battle.voted = true;
      button.classList.add("chosen");
      for (const [side, name] of [["a", result.model_a], ["b", result.model_b]]) {
        const badge = $(`arena-name-${side}`);
        badge.textContent = name;
        badge.className = `badge revealed${winner === side ? " winner" : ""}`;
      }
      notice("Thanks for voting! Send a new prompt to start another round.");
    } catch (error) {
      notice(`The vote failed: ${error.message}`);
    }
    refreshButtons();
  }

  for (const button of document.querySelectorAll("#arena-votes button")) {
    button.addEventListener("click", () => vote(button.dataset.winner, button));
  }
  $("arena-new").addEventListener("click", resetArena);

  // --- leaderboard ------------------------------------------------------------------------

  // "+12/-9": how far the 95% interval reaches above and below the rating.
  function interval(entry) {
    if (entry.rating === null) return "—";
    return `+${Math.round(entry.ci_upper - entry.rating)}/-${Math.round(entry.rating - entry.ci_lower)}`;
  }

  async function loadLeaderboard() {
    const rows = $("leaderboard-rows");
    try {
      const board = await (await api("/api/v1/leaderboard")).json();
      $("leaderboard-summary").textContent =
        `Bradley-Terry ratings from ${board.total_votes} vote${board.total_votes === 1 ? "" : "s"} in the arena, ` +
        "with 95% bootstrap intervals, and MT-bench scores.";
      if (!board.data.length) {
        rows.innerHTML = '<tr><td class="empty-row" colspan="9">No votes yet: play a round in the Arena.</td></tr>';
        return;
      }
      const dash = (value, show) => (value === null ? "—" : show(value));
      rows.replaceChildren(
        ...board.data.map((entry) => {
          const row = document.createElement("tr");
          const cells = [
            dash(entry.rank, String),
            entry.model,
            dash(entry.rating, (r) => String(Math.round(r))),
            interval(entry),
            entry.votes,
            entry.wins,
            entry.ties,
            entry.losses,
            dash(entry.mt_bench, (score) => score.toFixed(2)),
          ];
          for (const value of cells) {
            const cell = document.createElement("td");
            cell.textContent = String(value);
            row.appendChild(cell);
          }
          if (entry.mt_bench_judge) row.lastChild.title = `judged by ${entry.mt_bench_judge}`;
          return row;
        }),
      );
    } catch (error) {
      $("leaderboard-summary").textContent = `Cannot load the leaderboard: ${error.message}`;
    }
  }
  $("leaderboard-refresh").addEventListener("click", loadLeaderboard);

  // --- tabs and buttons -------------------------------------------------------------------

  const modes = { chat: chatMode, side: sideMode, arena: arenaMode };
  let tab = "chat";

  function refreshButtons() {
    const busy = running.size > 0;
    $("chat-regenerate").disabled = busy || !chatMode.canRegenerate();
    $("side-regenerate").disabled = busy || !sideMode.canRegenerate();
    $("chat-clear").disabled = busy;
    $("side-clear").disabled = busy;
    $("arena-new").disabled = busy;
    const canVote = Boolean(battle && battle.answered && !battle.voted && !busy);
    for (const button of document.querySelectorAll("#arena-votes button")) button.disabled = !canVote;
    $("send").disabled = tab !== "arena" && chatModels.length === 0;
  }

  function showTab(name) {
    tab = name;
    for (const button of document.querySelectorAll(".tabs button")) {
      button.setAttribute("aria-selected", String(button.dataset.tab === name));
    }
    for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.dataset.panel !== name;
    $("composer").hidden = name === "leaderboard";
    if (name === "leaderboard") loadLeaderboard();
    refreshButtons();
  }
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }

  $("chat-regenerate").addEventListener("click", () => chatMode.regenerate());
  $("side-regenerate").addEventListener("click", () => sideMode.regenerate());
  $("chat-clear").addEventListener("click", () => { chatMode.clear(); refreshButtons(); });
  $("side-clear").addEventListener("click", () => { sideMode.clear(); refreshButtons(); });

  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("prompt");
    const text = prompt.value.trim();
    if (!text || running.size > 0 || !modes[tab]) return;
    prompt.value = "";
    try {
      await modes[tab].send(text);
    } catch (error) {
      notice(tab === "arena" ? `Cannot start a round: ${error.message}` : "");
    }
    refreshButtons();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });

  for (const [input, output, digits] of [["temperature", "temperature-value", 2], ["top-p", "top-p-value", 2]]) {
    const update = () => ($(output).textContent = parseFloat($(input).value).toFixed(digits));
    $(input).addEventListener("input", update);
    update();
  }

  setupMarkdown();
  showTab("chat");
  loadModels();
})();
