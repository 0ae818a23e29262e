// What every nbdsnap command shares: exit codes, one-line errors on stderr,
// and GLib option parsing that owns what GLib allocates.
#pragma once

#include <glib.h>

#include <optional>
#include <string>
#include <vector>

namespace snap::cli {

// Exit codes (see man/nbdsnap.pod, EXIT STATUS).
inline constexpr int kOk = 0;
inline constexpr int kFail = 1;   // failure, a damaged store, a refusal
inline constexpr int kUsage = 2;  // bad command line
inline constexpr int kUnreachable = 3;  // -c: the socket cannot be reached

// "nbdsnap: WHY" on stderr; returns kFail.
int Fail(const std::string& why);
// "nbdsnap: WHY (see HINT)" on stderr; returns kUsage.
int UsageError(const std::string& why, const std::string& hint = "nbdsnap --help");

// One command's command line. Options may come before or after the
// positional arguments; "--" ends the options. -h/--help prints the
// command's help on stdout.
class CommandLine {
 public:
  // command: "create", or "-c SOCKET take"; params: "FILE"; summary: one
  // line shown under the usage line.
  CommandLine(std::string command, std::string params, std::string summary);
  ~CommandLine();
  CommandLine(const CommandLine&) = delete;
  CommandLine& operator=(const CommandLine&) = delete;

  // Both must be called before Parse; the help text is shown as given.
  void AddFlag(const char* name, const char* help);
  void AddString(const char* name, const char* arg, const char* help);

  // Parses argv (argv[0] is the command's name). nullopt: go on and run
  // the command; otherwise exit with that code (help shown, or a usage
  // error reported: an option's value with a control character is one).
  std::optional<int> Parse(int argc, char** argv);

  bool flag(const char* name) const;
  std::optional<std::string> string(const char* name) const;
  const std::vector<std::string>& args() const { return args_; }

  // A usage error that points at this command's --help.
  int UsageError(const std::string& why) const;

 private:
  struct Option {
    std::string name;
    std::string arg;   // empty for a flag
    std::string help;
    gboolean flag_value = FALSE;
    gchar* string_value = nullptr;  // g_free'd by the destructor
  };
  const Option* Find(const char* name) const;
  // An option whose value holds a control character (none is a valid
  // value, a newline would end the line a live command sends), or null.
  const Option* FindControlCharacter() const;

  std::string command_, params_, summary_;
  std::vector<Option> options_;
  std::vector<std::string> args_;
};

}  // namespace snap::cli
