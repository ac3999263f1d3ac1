// chatfleet-chat (C++): lists the models through ControllerService, asks the controller for a worker
// serving the chosen model, streams Generate from that worker and prints the text as it arrives.
//
//   chatfleet-chat [--jsonl] [--temperature T] [--timeout S] CONTROLLER MODEL PROMPT [MAX_TOKENS]
//
// stdout: the completion as it streams (or, with --jsonl, one JSON object per streamed message);
// stderr: the chosen worker and, at the end, the finish reason and token usage.
// Exit status: 0 done, 1 a gRPC or model error, 2 bad usage.

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "chatfleet/v1/controller.grpc.pb.h"
#include "chatfleet/v1/worker.grpc.pb.h"

namespace {

namespace v1 = chatfleet::v1;
using Clock = std::chrono::system_clock;

constexpr auto kUnaryDeadline = std::chrono::seconds(10);

struct Options {
  bool jsonl = false;
  std::optional<float> temperature;
  int timeout_seconds = 300;
  std::string controller;
  std::string model;
  std::string prompt;
  std::optional<unsigned> max_tokens;
};

const char kUsage[] =
    "usage: chatfleet-chat [options] CONTROLLER MODEL PROMPT [MAX_TOKENS]\n"
    "  CONTROLLER      host:port of the chatfleet controller (e.g. 127.0.0.1:21001)\n"
    "  MODEL           a model name the controller lists\n"
    "  PROMPT          the user message (sent as chat when the model supports it)\n"
    "  MAX_TOKENS      how many tokens to generate at most\n"
    "options:\n"
    "  --jsonl         print one JSON object per streamed message instead of the text\n"
    "  --temperature T sampling temperature (0 = greedy; default: the worker's)\n"
    "  --timeout S     deadline of the whole generation in seconds (default 300)\n";

int UsageError(const std::string& message) {
  std::cerr << "chatfleet-chat: " << message << "\n" << kUsage;
  return 2;
}

// Parses a whole string as a number, or returns nullopt.
template <typename T>
std::optional<T> ParseNumber(const std::string& text) {
  try {
    size_t used = 0;
    T value;
    if constexpr (std::is_floating_point_v<T>) {
      value = static_cast<T>(std::stod(text, &used));
    } else {
      if (text.empty() || text[0] == '-') return std::nullopt;
      value = static_cast<T>(std::stoul(text, &used));
    }
    if (used != text.size()) return std::nullopt;
    return value;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// Returns an exit status when parsing ends the program (help or bad usage), nullopt otherwise.
std::optional<int> ParseArgs(int argc, char** argv, Options& options) {
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--jsonl") {
      options.jsonl = true;
    } else if (arg == "--temperature" || arg == "--timeout") {
      if (i + 1 == argc) return UsageError(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--temperature") {
        options.temperature = ParseNumber<float>(value);
        if (!options.temperature || *options.temperature < 0) {
          return UsageError("--temperature must be a number >= 0, got '" + value + "'");
        }
      } else {
        auto seconds = ParseNumber<unsigned>(value);
        if (!seconds || *seconds == 0) {
          return UsageError("--timeout must be a whole number of seconds > 0, got '" + value + "'");
        }
        options.timeout_seconds = static_cast<int>(*seconds);
      }
    } else if (arg.size() > 1 && arg[0] == '-') {
      return UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 3 || positional.size() > 4) {
    return UsageError("expected CONTROLLER MODEL PROMPT [MAX_TOKENS]");
  }
  options.controller = positional[0];
  options.model = positional[1];
  options.prompt = positional[2];
  if (positional.size() == 4) {
    options.max_tokens = ParseNumber<unsigned>(positional[3]);
    if (!options.max_tokens || *options.max_tokens == 0) {
      return UsageError("MAX_TOKENS must be a whole number > 0, got '" + positional[3] + "'");
    }
  }
  return std::nullopt;
}

// grpc::StatusCode's name as in the gRPC spec (grpc++ offers no such function).
const char* StatusName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  const auto index = static_cast<size_t>(code);
  return index < std::size(kNames) ? kNames[index] : "UNKNOWN";
}

int RpcError(const std::string& what, const std::string& address, const grpc::Status& status) {
  std::cerr << "chatfleet-chat: " << what << " at " << address << " failed: "
            << StatusName(status.error_code()) << ": " << status.error_message() << "\n";
  return 1;
}

std::string ToJsonLine(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions print;
  print.preserve_proto_field_names = true;  // snake_case, as grpcurl and the Node client print
  std::string line;
  if (!google::protobuf::util::MessageToJsonString(message, &line, print).ok()) return "{}";
  return line;
}

int Run(const Options& options) {
  auto controller_channel =
      grpc::CreateChannel(options.controller, grpc::InsecureChannelCredentials());
  auto controller = v1::ControllerService::NewStub(controller_channel);

  // 1. The models the fleet serves right now.
  v1::ListModelsResponse models;
  {
    grpc::ClientContext context;
    context.set_deadline(Clock::now() + kUnaryDeadline);
    grpc::Status status = controller->ListModels(&context, v1::ListModelsRequest(), &models);
    if (!status.ok()) return RpcError("ListModels", options.controller, status);
  }
  std::string names;
  bool listed = false;
  for (const auto& model : models.models()) {
    names += (names.empty() ? "" : ", ") + model.name();
    listed = listed || model.name() == options.model;
  }
  if (!listed) {
    std::cerr << "chatfleet-chat: model '" << options.model << "' is not served; the controller lists: "
              << (names.empty() ? "(none)" : names) << "\n";
    return 1;
  }

  // 2. A worker for the model, chosen by the controller's dispatcher.
  v1::SelectWorkerResponse selected;
  {
    v1::SelectWorkerRequest request;
    request.set_model(options.model);
    grpc::ClientContext context;
    context.set_deadline(Clock::now() + kUnaryDeadline);
    grpc::Status status = controller->SelectWorker(&context, request, &selected);
    if (!status.ok()) return RpcError("SelectWorker", options.controller, status);
  }
  std::cerr << "worker: " << selected.address() << " (model " << selected.model().name() << ")\n";

  // 3. Stream the completion straight from that worker.
  v1::GenerateRequest request;
  request.set_model(options.model);
  if (selected.model().supports_chat()) {
    auto* message = request.mutable_chat()->add_messages();
    message->set_role("user");
    message->set_content(options.prompt);
  } else {
    request.set_text(options.prompt);
  }
  if (options.temperature) request.mutable_sampling()->set_temperature(*options.temperature);
  if (options.max_tokens) request.mutable_stopping()->set_max_tokens(*options.max_tokens);

  auto worker = v1::WorkerService::NewStub(
      grpc::CreateChannel(selected.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(Clock::now() + std::chrono::seconds(options.timeout_seconds));
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> stream(
      worker->Generate(&context, request));
  v1::GenerateResponse chunk;
  v1::GenerateResponse last;
  while (stream->Read(&chunk)) {
    if (options.jsonl) {
      std::cout << ToJsonLine(chunk) << std::endl;  // flushed: each message shows as it arrives
    } else {
      std::cout << chunk.text() << std::flush;
    }
    last = chunk;
  }
  grpc::Status status = stream->Finish();
  if (!options.jsonl) std::cout << std::endl;
  if (!status.ok()) return RpcError("Generate", selected.address(), status);
  std::cerr << "finish_reason: " << v1::FinishReason_Name(last.finish_reason())
            << ", prompt_tokens: " << last.usage().prompt_tokens()
            << ", completion_tokens: " << last.usage().completion_tokens() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (auto exit_status = ParseArgs(argc, argv, options)) return *exit_status;
  return Run(options);
}
