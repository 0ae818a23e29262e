// nbdsnap's offline commands, on a COW file directly. Each takes argv
// starting at the command's name and returns nbdsnap's exit code.
#pragma once

namespace snap::offline {

int Create(int argc, char** argv);
int Info(int argc, char** argv);
int Check(int argc, char** argv);
int Dump(int argc, char** argv);

}  // namespace snap::offline
