#!/usr/bin/env node
// chatfleet-chat (Node.js): lists the models through ControllerService, asks the controller for a worker
// serving the chosen model, streams Generate from that worker and prints the text as it arrives.
// The .proto files are loaded at run time from protos/ (no generated code).
//
//   node chat.js [--jsonl] [--temperature T] [--timeout S] CONTROLLER MODEL PROMPT [MAX_TOKENS]
//
// stdout: the completion as it streams (or, with --jsonl, one JSON object per streamed message);
// stderr: the chosen worker and, at the end, the finish reason and token usage.
// Exit status: 0 done, 1 a gRPC or model error, 2 bad usage.

import { randomUUID } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = dirname(fileURLToPath(import.meta.url));
const UNARY_DEADLINE_MS = 10_000;
const USAGE = `usage: chatfleet-chat [options] CONTROLLER MODEL PROMPT [MAX_TOKENS]
  CONTROLLER      host:port of the chatfleet controller (e.g. 127.0.0.1:21001)
  MODEL           a model name the controller lists
  PROMPT          the user message (sent as chat when the model supports it)
  MAX_TOKENS      how many tokens to generate at most
options:
  --jsonl         print one JSON object per streamed message instead of the text
  --temperature T sampling temperature (0 = greedy; default: the worker's)
  --timeout S     deadline of the whole generation in seconds (default 300)
  --protos DIR    where chatfleet/v1/*.proto live (default: CHATFLEET_PROTOS or the repository's protos/)`;

class UsageError extends Error {}

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      jsonl: { type: "boolean", default: false },
      temperature: { type: "string" },
      timeout: { type: "string", default: "300" },
      protos: { type: "string", default: process.env.CHATFLEET_PROTOS ?? join(HERE, "..", "..", "protos") },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return { help: true };
  if (positionals.length < 3 || positionals.length > 4) {
    throw new UsageError("expected CONTROLLER MODEL PROMPT [MAX_TOKENS]");
  }
  const [controller, model, prompt, maxTokensText] = positionals;
  const wholeNumber = (text, what) => {
    if (!/^[1-9][0-9]*$/.test(text)) throw new UsageError(`${what} must be a whole number > 0, got '${text}'`);
    return Number(text);
  };
  let temperature;
  if (values.temperature !== undefined) {
    temperature = Number(values.temperature);
    if (values.temperature.trim() === "" || !Number.isFinite(temperature) || temperature < 0) {
      throw new UsageError(`--temperature must be a number >= 0, got '${values.temperature}'`);
    }
  }
  return {
    controller,
    model,
    prompt,
    maxTokens: maxTokensText === undefined ? undefined : wholeNumber(maxTokensText, "MAX_TOKENS"),
    temperature,
    timeoutMs: wholeNumber(values.timeout, "--timeout") * 1000,
    jsonl: values.jsonl,
    protos: values.protos,
  };
}

function loadContracts(protosDir) {
  const definition = protoLoader.loadSync(["chatfleet/v1/controller.proto", "chatfleet/v1/worker.proto"], {
    includeDirs: [protosDir],
    keepCase: true, // snake_case field names, as in the .proto files and grpcurl's output
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).chatfleet.v1;
}

const deadline = (ms) => ({ deadline: new Date(Date.now() + ms) });

// Promisified unary call: resolves with the response, rejects with the ServiceError.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(UNARY_DEADLINE_MS), (error, response) =>
      error ? reject(Object.assign(error, { rpc: method })) : resolve(response),
    );
  });
}

// Streams Generate, writing each message as it arrives; resolves with the last message.
function streamGenerate(worker, request, { jsonl, timeoutMs }) {
  return new Promise((resolve, reject) => {
    const call = worker.Generate(request, deadline(timeoutMs));
    // Ctrl-C cancels the stream, so the worker stops generating for us.
    const cancel = () => call.cancel();
    process.once("SIGINT", cancel);
    let last;
    call.on("data", (message) => {
      last = message;
      process.stdout.write(jsonl ? `${JSON.stringify(message)}\n` : message.text);
    });
    call.on("error", (error) => {
      process.off("SIGINT", cancel);
      reject(Object.assign(error, { rpc: "Generate" }));
    });
    call.on("end", () => {
      process.off("SIGINT", cancel);
      resolve(last);
    });
  });
}

async function run(options) {
  const v1 = loadContracts(options.protos);
  const credentials = grpc.credentials.createInsecure();
  const controller = new v1.ControllerService(options.controller, credentials);
  try {
    // 1. The models the fleet serves right now.
    const { models } = await unary(controller, "ListModels", {});
    const names = models.map((model) => model.name);
    if (!names.includes(options.model)) {
      console.error(
        `chatfleet-chat: model '${options.model}' is not served; the controller lists: ${names.join(", ") || "(none)"}`,
      );
      return 1;
    }
    // 2. A worker for the model, chosen by the controller's dispatcher.
    const selected = await unary(controller, "SelectWorker", { model: options.model });
    console.error(`worker: ${selected.address} (model ${selected.model.name})`);

    // 3. Stream the completion straight from that worker.
    const request = {
      request_id: randomUUID(),
      model: options.model,
      ...(selected.model.supports_chat
        ? { chat: { messages: [{ role: "user", content: options.prompt }] } }
        : { text: options.prompt }),
      sampling: options.temperature === undefined ? {} : { temperature: options.temperature },
      stopping: options.maxTokens === undefined ? {} : { max_tokens: options.maxTokens },
    };
    const worker = new v1.WorkerService(selected.address, credentials);
    try {
      const last = await streamGenerate(worker, request, options);
      if (!options.jsonl) process.stdout.write("\n");
      console.error(
        `finish_reason: ${last?.finish_reason}, prompt_tokens: ${last?.usage?.prompt_tokens}, ` +
          `completion_tokens: ${last?.usage?.completion_tokens}`,
      );
      return 0;
    } finally {
      worker.close();
    }
  } catch (error) {
    if (error.code === undefined) throw error;
    const code = grpc.status[error.code] ?? error.code;
    console.error(`chatfleet-chat: ${error.rpc} failed: ${code}: ${error.details}`);
    return 1;
  } finally {
    controller.close();
  }
}

async function main() {
  let options;
  try {
    options = parseCommandLine(process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof UsageError) && error.code?.startsWith?.("ERR_PARSE_ARGS") !== true) throw error;
    console.error(`chatfleet-chat: ${error.message}\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  return run(options);
}

process.exitCode = await main();
