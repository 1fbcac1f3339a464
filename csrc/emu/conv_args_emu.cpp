// The shared argument checks, compiled into the emulated library as its own
// object: the _C and _emu extensions use different flags, and one object file
// shared between them would be rebuilt (and relinked into both) on every build.
#include "../common/conv_args.cpp"
