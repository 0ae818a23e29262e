#include "tools/cli.h"

#include <cstdio>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"

namespace snap::cli {

int Fail(const std::string& why) {
  std::fprintf(stderr, "nbdsnap: %s\n", why.c_str());
  return kFail;
}

int UsageError(const std::string& why, const std::string& hint) {
  std::fprintf(stderr, "nbdsnap: %s (see %s)\n", why.c_str(), hint.c_str());
  return kUsage;
}

CommandLine::CommandLine(std::string command, std::string params, std::string summary)
    : command_(std::move(command)), params_(std::move(params)), summary_(std::move(summary)) {
  options_.reserve(8);
}

CommandLine::~CommandLine() {
  for (Option& o : options_) g_free(o.string_value);
}

void CommandLine::AddFlag(const char* name, const char* help) {
  options_.push_back(Option{name, "", help});
}

void CommandLine::AddString(const char* name, const char* arg, const char* help) {
  options_.push_back(Option{name, arg, help});
}

const CommandLine::Option* CommandLine::Find(const char* name) const {
  for (const Option& o : options_)
    if (o.name == name) return &o;
  return nullptr;
}

const CommandLine::Option* CommandLine::FindControlCharacter() const {
  for (const Option& o : options_)
    if (o.string_value != nullptr)
      for (const char* p = o.string_value; *p != '\0'; ++p)
        if (static_cast<unsigned char>(*p) < ' ' || *p == 0x7f) return &o;
  return nullptr;
}

bool CommandLine::flag(const char* name) const {
  const Option* o = Find(name);
  return o != nullptr && o->flag_value;
}

std::optional<std::string> CommandLine::string(const char* name) const {
  const Option* o = Find(name);
  if (o == nullptr || o->string_value == nullptr) return std::nullopt;
  return std::string(o->string_value);
}

int CommandLine::UsageError(const std::string& why) const {
  return cli::UsageError(why, absl::StrFormat("nbdsnap %s --help", command_));
}

std::optional<int> CommandLine::Parse(int argc, char** argv) {
  // GLib prints its own --help through the locale's charset and exits;
  // ours goes to stdout as is and returns, so add -h/--help by hand.
  gboolean help = FALSE;
  std::vector<GOptionEntry> entries;
  entries.push_back({"help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", nullptr});
  for (Option& o : options_) {
    if (o.arg.empty())
      entries.push_back({o.name.c_str(), 0, 0, G_OPTION_ARG_NONE, &o.flag_value,
                         o.help.c_str(), nullptr});
    else
      entries.push_back({o.name.c_str(), 0, 0, G_OPTION_ARG_STRING, &o.string_value,
                         o.help.c_str(), o.arg.c_str()});
  }
  entries.push_back({nullptr, 0, 0, G_OPTION_ARG_NONE, nullptr, nullptr, nullptr});

  g_set_prgname(("nbdsnap " + command_).c_str());
  GOptionContext* oc = g_option_context_new(params_.c_str());
  g_option_context_set_help_enabled(oc, FALSE);
  g_option_context_set_summary(oc, summary_.c_str());
  g_option_context_add_main_entries(oc, entries.data(), nullptr);

  // A copy GLib may shuffle and shorten; argv itself stays as it was.
  gchar** strv = g_new0(gchar*, argc + 1);
  for (int i = 0; i < argc; ++i) strv[i] = g_strdup(argv[i]);
  GError* gerr = nullptr;
  std::optional<int> result;
  if (!g_option_context_parse_strv(oc, &strv, &gerr)) {
    result = UsageError(gerr->message);
    g_error_free(gerr);
  } else if (help) {
    gchar* text = g_option_context_get_help(oc, TRUE, nullptr);
    std::fputs(text, stdout);
    g_free(text);
    result = kOk;
  } else if (const Option* bad = FindControlCharacter()) {
    result = UsageError(absl::StrFormat(
        "--%s '%s' contains a control character, which no value holds: remove it",
        bad->name, absl::CHexEscape(bad->string_value)));
  } else {
    args_.clear();
    bool options_ended = false;
    for (gchar** p = strv + 1; *p != nullptr; ++p) {
      // GLib keeps a "--" when something follows it; it only ends options.
      if (!options_ended && std::strcmp(*p, "--") == 0) {
        options_ended = true;
        continue;
      }
      args_.emplace_back(*p);
    }
  }
  g_strfreev(strv);
  g_option_context_free(oc);
  return result;
}

}  // namespace snap::cli
