// The host side of the emulator, for the bindings and the C++ drivers: the buffers a launch may touch, the
// error a broken kernel raises, and counts of what ran.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastattn_emu {

// Raised (by the launch that ran the kernel) for a race, an out-of-bounds access, a deadlock, a warp
// operation whose mask is wrong or a read of shared memory before its cp.async landed.
struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A global buffer the kernels of the next launches may access: [ptr, ptr + bytes), read-only unless writable.
struct Buffer {
  std::string name;
  uintptr_t ptr;
  uint64_t bytes;
  bool writable;
};

void set_buffers(std::vector<Buffer> buffers);

// Counts since the process started: launches, blocks, threads, barriers, warp collectives, cp.async copies,
// shared and global accesses checked.
std::map<std::string, uint64_t> stats();

}  // namespace fastattn_emu
