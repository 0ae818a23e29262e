// Just enough JSON for nbdsnap's --json outputs, written by hand: string
// literals with proper escaping, and one-line objects.
#pragma once

#include <glib.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace snap {

// A JSON string literal. Bytes that are not UTF-8 (file names need not
// be) become U+FFFD, so the output is always valid JSON.
inline std::string JsonString(const std::string& s) {
  gchar* valid = g_utf8_make_valid(s.data(), static_cast<gssize>(s.size()));
  std::string out = "\"";
  for (const char* p = valid; *p != '\0'; ++p) {
    const unsigned char c = static_cast<unsigned char>(*p);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || c == 0x7f)
          out += absl::StrFormat("\\u%04x", c);
        else
          out += static_cast<char>(c);
    }
  }
  g_free(valid);
  return out + "\"";
}

// {"key": value, ...} on one line, keys in the order added.
class JsonObject {
 public:
  JsonObject& Raw(const std::string& key, const std::string& json) {
    fields_.push_back(absl::StrCat(JsonString(key), ": ", json));
    return *this;
  }
  JsonObject& String(const std::string& key, const std::string& v) {
    return Raw(key, JsonString(v));
  }
  JsonObject& String(const std::string& key, const char* v) {
    return Raw(key, JsonString(v));
  }
  JsonObject& String(const std::string& key, const std::optional<std::string>& v) {
    return Raw(key, v ? JsonString(*v) : "null");
  }
  JsonObject& Number(const std::string& key, uint64_t v) {
    return Raw(key, absl::StrCat(v));
  }
  JsonObject& Number(const std::string& key, const std::optional<uint64_t>& v) {
    return Raw(key, v ? absl::StrCat(*v) : "null");
  }
  JsonObject& Bool(const std::string& key, bool v) {
    return Raw(key, v ? "true" : "false");
  }
  JsonObject& Strings(const std::string& key, const std::vector<std::string>& v) {
    std::vector<std::string> items;
    for (const std::string& s : v) items.push_back(JsonString(s));
    return Raw(key, absl::StrCat("[", absl::StrJoin(items, ", "), "]"));
  }
  std::string Str() const { return absl::StrCat("{", absl::StrJoin(fields_, ", "), "}"); }

 private:
  std::vector<std::string> fields_;
};

}  // namespace snap
