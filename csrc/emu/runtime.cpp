// Fiber scheduler of the CUDA emulator (see cuda_emu.h for the model).
//
// Context switches are a dozen instructions of x86-64 assembly (callee-saved
// registers, MXCSR and the x87 control word, stack pointer): ucontext's
// swapcontext makes a signal-mask syscall per switch, which is what made
// one-OS-thread-per-CUDA-thread and ucontext prototypes 10-50x slower.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DCE_EMU_ASAN 1
// For the frames at the bottom of every fiber, which never return: their
// redzones would stay poisoned and trip the next block's frames at the same
// addresses.
#define DCE_EMU_NO_ASAN __attribute__((no_sanitize_address))
#else
#define DCE_EMU_NO_ASAN
#define DCE_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is implemented for x86-64 only"
#endif

extern "C" void dce_emu_switch(void** save_sp, void* new_sp);

// Saves the callee-saved state of the running context on its own stack, stores
// the stack pointer in *save_sp, and resumes the context whose stack pointer
// is new_sp (saved the same way, or prepared by prepare_stack below).
asm(R"(
  .text
  .globl dce_emu_switch
  .type dce_emu_switch,@function
dce_emu_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size dce_emu_switch,.-dce_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace dce::emu {
namespace {

#if DCE_EMU_ASAN
constexpr size_t kStackBytes = size_t{1} << 20;
#else
constexpr size_t kStackBytes = size_t{128} << 10;
#endif
// The default per-block dynamic shared memory limit of every GPU since sm_70;
// more needs cudaFuncSetAttribute, which the launchers do not do.
constexpr size_t kMaxDynamicSmem = 48 << 10;
constexpr int kMaxThreadsPerBlock = 1024;

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ThreadInfo info{};
  void* sp = nullptr;
  State state = State::Runnable;
  const char* file = nullptr;  // where it waits (barrier) or what it waits in (warp op)
  int line = 0;
  uint64_t exchanged[kWarpSize];  // this fiber's copy of its last warp collective
  void* fake_stack = nullptr;     // ASan bookkeeping
};

struct Warp {
  unsigned expected = 0;  // mask of the collective in progress
  unsigned arrived = 0;
  unsigned present = 0;  // lanes that exist in this (possibly partial) warp
  const char* what = nullptr;
  uint64_t slots[kWarpSize];
};

std::string dim_str(uint3 v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

class BlockRunner;
thread_local BlockRunner* tl_runner = nullptr;

void fiber_entry();

class BlockRunner {
 public:
  ~BlockRunner() { release_stacks(); }

  void configure(dim3 block, size_t smem_bytes, const std::function<void()>* body) {
    block_dim_ = block;
    nthreads_ = static_cast<int>(block.x * block.y * block.z);
    body_ = body;
    smem_.assign(smem_bytes, 0);
    reserve_stacks(nthreads_);
#if DCE_EMU_ASAN
    // The bottom frames of every fiber (fiber_entry, run_current_and_exit) never
    // return, so their redzones stay poisoned; the next kernel's frames need a
    // clean stack.
    ASAN_UNPOISON_MEMORY_REGION(stacks_, capacity_ * kStackBytes);
#endif
    fibers_.resize(nthreads_);
    const int nwarps = (nthreads_ + kWarpSize - 1) / kWarpSize;
    warps_.assign(nwarps, Warp{});
    for (int w = 0; w < nwarps; ++w) {
      const int lanes = std::min(kWarpSize, nthreads_ - w * kWarpSize);
      warps_[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    for (int i = 0; i < nthreads_; ++i) {
      const unsigned x = i % block.x, y = (i / block.x) % block.y, z = i / (block.x * block.y);
      fibers_[i].info.thread_idx = uint3{x, y, z};
      fibers_[i].info.linear = i;
    }
  }

  void run_block(uint3 block_idx, dim3 grid) {
    tl_block.block_idx = block_idx;
    tl_block.block_dim = block_dim_;
    tl_block.grid_dim = grid;
    // NaN in every floating-point width (and -1 in every integer width), so a
    // read of dynamic shared memory no thread has written shows in the result.
    if (!smem_.empty()) std::memset(smem_.data(), 0xff, smem_.size());
    tl_block.dynamic_smem = smem_.empty() ? nullptr : smem_.data();
    tl_block.dynamic_smem_bytes = smem_.size();
    bar_arrived_ = 0;
    for (auto& w : warps_) {
      w.arrived = 0;
      w.expected = 0;
    }
    for (int i = 0; i < nthreads_; ++i) {
      fibers_[i].state = State::Runnable;
      fibers_[i].sp = prepare_stack(i);
    }
    done_ = 0;
    error_.clear();
    tl_runner = this;
    while (done_ < nthreads_) {
      bool progressed = false;
      for (int i = 0; i < nthreads_; ++i) {
        if (fibers_[i].state != State::Runnable) continue;
        resume(i);
        progressed = true;
        if (!error_.empty()) abort_block(error_);
      }
      if (!progressed) abort_block(deadlock_report());
    }
    tl_runner = nullptr;
  }

  // ---- called from fibers ----
  void syncthreads(const char* file, int line) {
    Fiber& f = *current_;
    if (bar_arrived_ == 0) {
      bar_file_ = file;
      bar_line_ = line;
    } else if (bar_line_ != line || std::strcmp(bar_file_, file) != 0) {
      std::ostringstream s;
      s << "barrier divergence: thread " << dim_str(f.info.thread_idx) << " reached __syncthreads at "
        << file << ":" << line << " while " << bar_arrived_ << " thread(s) wait at " << bar_file_
        << ":" << bar_line_;
      fail(s.str());
    }
    if (++bar_arrived_ == nthreads_) {
      bar_arrived_ = 0;
      for (auto& other : fibers_)
        if (other.state == State::AtBarrier) other.state = State::Runnable;
      return;
    }
    f.state = State::AtBarrier;
    f.file = file;
    f.line = line;
    yield();
  }

  const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what) {
    Fiber& f = *current_;
    const int lane = f.info.linear % kWarpSize;
    Warp& w = warps_[f.info.linear / kWarpSize];
    if (((mask >> lane) & 1u) == 0) {
      std::ostringstream s;
      s << what << ": calling lane " << lane << " (thread " << dim_str(f.info.thread_idx)
        << ") is not in mask 0x" << std::hex << mask;
      fail(s.str());
    }
    if ((mask & ~w.present) != 0) {
      std::ostringstream s;
      s << what << ": mask 0x" << std::hex << mask << " names lanes that do not exist in warp "
        << std::dec << f.info.linear / kWarpSize << " (block of " << nthreads_ << " threads)";
      fail(s.str());
    }
    if (w.arrived == 0) {
      w.expected = mask;
      w.what = what;
    } else if (w.expected != mask || std::strcmp(w.what, what) != 0) {
      std::ostringstream s;
      s << "warp divergence: lane " << lane << " calls " << what << " with mask 0x" << std::hex
        << mask << " while lanes 0x" << w.arrived << " wait in " << w.what << " with mask 0x"
        << w.expected;
      fail(s.str());
    }
    w.slots[lane] = value;
    w.arrived |= 1u << lane;
    if (w.arrived == w.expected) {
      // Each participant keeps its own copy, so the warp's next collective can
      // reuse the slots before a released lane has read its result.
      const int base = (f.info.linear / kWarpSize) * kWarpSize;
      for (int l = 0; l < kWarpSize; ++l) {
        if (((w.expected >> l) & 1u) == 0) continue;
        Fiber& p = fibers_[base + l];
        std::memcpy(p.exchanged, w.slots, sizeof(w.slots));
        if (p.state == State::AtWarp) p.state = State::Runnable;
      }
      w.arrived = 0;
      return f.exchanged;
    }
    f.state = State::AtWarp;
    f.file = what;
    f.line = 0;
    yield();
    return f.exchanged;
  }

  // Ends the calling fiber with an error, without unwinding its stack: the
  // scheduler aborts the block and throws from its own stack. (A C++ throw on a
  // fiber stack is supported too, see below, but confuses ASan's stack
  // bookkeeping after earlier aborted blocks, and this path needs no unwinding.)
  // Not declared [[noreturn]] (nor is anything else called on a fiber stack):
  // ASan instruments calls to noreturn functions with __asan_handle_no_return,
  // which mishandles fiber stacks. It never returns all the same.
  void fail(const std::string& message) {  // (the caller's frames are abandoned)
    Fiber& f = *current_;
    record_error(f, message.c_str());
    f.state = State::Done;
    ++done_;
    exit_fiber();
  }

  DCE_EMU_NO_ASAN __attribute__((noinline)) void exit_fiber() {
#if DCE_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, sched_stack_bottom_, sched_stack_size_);
#endif
    void* dead_sp;
    dce_emu_switch(&dead_sp, sched_sp_);  // never resumed
  }

  DCE_EMU_NO_ASAN void run_current_and_exit() {
    Fiber& f = *current_;
#if DCE_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched_stack_bottom_, &sched_stack_size_);
#endif
    try {
      (*body_)();
    } catch (const std::exception& e) {
      record_error(f, e.what());
    } catch (...) {
      record_error(f, "unknown exception");
    }
    f.state = State::Done;
    ++done_;
    exit_fiber();
  }

 private:
  void reserve_stacks(int n) {
    if (static_cast<size_t>(n) <= capacity_) return;
    release_stacks();
    const size_t bytes = static_cast<size_t>(n) * kStackBytes;
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) throw Error("CUDA emulator: cannot map fiber stacks");
    stacks_ = static_cast<char*>(mem);
    capacity_ = n;
    // A guard page under each stack turns a fiber's stack overflow into a
    // crash at the overflowing access instead of silent corruption of its neighbour.
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (int i = 0; i < n; ++i) mprotect(stacks_ + i * kStackBytes, page, PROT_NONE);
  }

  void release_stacks() {
    if (stacks_ == nullptr) return;
#if DCE_EMU_ASAN
    // Stale stack poisoning would otherwise outlive the mapping and hit
    // whatever the address range is reused for.
    ASAN_UNPOISON_MEMORY_REGION(stacks_, capacity_ * kStackBytes);
#endif
    munmap(stacks_, capacity_ * kStackBytes);
    stacks_ = nullptr;
    capacity_ = 0;
  }

  void* prepare_stack(int i) {
    char* top = stacks_ + (static_cast<size_t>(i) + 1) * kStackBytes;
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                            // fake return address of fiber_entry
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);     // popped by `ret`
    for (int r = 0; r < 6; ++r) *--sp = 0;                // rbp rbx r12 r13 r14 r15
    *--sp = 0x1f80ull | (uint64_t{0x037f} << 32);         // default MXCSR, x87 control word
    return sp;
  }

  void resume(int i) {
    Fiber& f = fibers_[i];
    current_ = &f;
    tl_thread = &f.info;
#if DCE_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched_fake_stack_, stacks_ + i * kStackBytes, kStackBytes);
#endif
    dce_emu_switch(&sched_sp_, f.sp);
#if DCE_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched_fake_stack_, nullptr, nullptr);
#endif
    tl_thread = nullptr;
    current_ = nullptr;
  }

  void yield() {
    Fiber& f = *current_;
#if DCE_EMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, sched_stack_bottom_, sched_stack_size_);
#endif
    dce_emu_switch(&f.sp, sched_sp_);
#if DCE_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &sched_stack_bottom_, &sched_stack_size_);
#endif
  }

  void record_error(const Fiber& f, const char* what) {
    if (!error_.empty()) return;
    std::ostringstream s;
    s << "in block " << dim_str(tl_block.block_idx) << ", thread " << dim_str(f.info.thread_idx)
      << ": " << what;
    error_ = s.str();
  }

  std::string deadlock_report() const {
    int at_bar = 0, at_warp = 0;
    const Fiber* bar = nullptr;
    const Fiber* warp = nullptr;
    for (const auto& f : fibers_) {
      if (f.state == State::AtBarrier) {
        ++at_bar;
        if (!bar) bar = &f;
      } else if (f.state == State::AtWarp) {
        ++at_warp;
        if (!warp) warp = &f;
      }
    }
    std::ostringstream s;
    s << "deadlock in block " << dim_str(tl_block.block_idx) << " of " << nthreads_
      << " threads: " << done_ << " exited";
    if (bar)
      s << ", " << at_bar << " wait at __syncthreads (" << bar->file << ":" << bar->line
        << ", first thread " << dim_str(bar->info.thread_idx) << ")";
    if (warp)
      s << ", " << at_warp << " wait in " << warp->file << " (first thread "
        << dim_str(warp->info.thread_idx) << ")";
    s << "; every thread of the block must reach each __syncthreads, and every lane of a mask "
         "its warp collective";
    return s.str();
  }

  [[noreturn]] void abort_block(const std::string& message) {
    // Suspended fibers are abandoned mid-kernel; their frames hold no resources
    // (kernels allocate nothing), but under ASan their stack redzones must be
    // cleared before the stacks are reused.
#if DCE_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stacks_, capacity_ * kStackBytes);
#endif
    tl_runner = nullptr;
    throw Error(message);
  }

  dim3 block_dim_{};
  int nthreads_ = 0;
  const std::function<void()>* body_ = nullptr;
  std::vector<unsigned char> smem_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  char* stacks_ = nullptr;
  size_t capacity_ = 0;
  void* sched_sp_ = nullptr;
  Fiber* current_ = nullptr;
  int done_ = 0;
  int bar_arrived_ = 0;
  const char* bar_file_ = nullptr;
  int bar_line_ = 0;
  std::string error_;
  void* sched_fake_stack_ = nullptr;
  const void* sched_stack_bottom_ = nullptr;
  size_t sched_stack_size_ = 0;
};

DCE_EMU_NO_ASAN void fiber_entry() { tl_runner->run_current_and_exit(); }

BlockRunner& thread_runner() {
  static thread_local BlockRunner runner;
  return runner;
}

BlockRunner& active_runner(const char* what) {
  if (tl_runner == nullptr || tl_thread == nullptr)
    throw Error(std::string(what) + " called outside an emulated kernel");
  return *tl_runner;
}

}  // namespace

void syncthreads(const char* file, int line) { active_runner("__syncthreads").syncthreads(file, line); }

const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what) {
  return active_runner(what).warp_exchange(mask, value, what);
}

void device_trap(const char* what, const char* file, int line) {
  active_runner(what).fail(std::string(what) + " at " + file + ":" + std::to_string(line));
}

int worker_threads() {
  if (const char* env = std::getenv("DCE_EMU_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

void launch_erased(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body,
                   const char* kernel_name) {
  if (tl_runner != nullptr) throw Error("kernel launch from inside an emulated kernel");
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  std::ostringstream bad;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64)
    bad << "block " << dim_str({block.x, block.y, block.z}) << " is not a valid CUDA block";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
           grid.z > 65535)
    bad << "grid " << dim_str({grid.x, grid.y, grid.z}) << " is not a valid CUDA grid";
  else if (dynamic_smem > kMaxDynamicSmem)
    bad << "dynamic shared memory of " << dynamic_smem << " bytes exceeds the default limit of "
        << kMaxDynamicSmem;
  if (!bad.str().empty()) throw Error("invalid launch of " + std::string(kernel_name) + ": " + bad.str());

  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const int workers = static_cast<int>(std::min<uint64_t>(worker_threads(), blocks));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  uint64_t error_block = UINT64_MAX;
  std::string error;

  auto work = [&] {
    BlockRunner& runner = thread_runner();
    try {
      runner.configure(block, dynamic_smem, &body);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(error_mutex);
      error_block = 0;
      error = e.what();
      stop = true;
      return;
    }
    while (!stop.load(std::memory_order_relaxed)) {
      const uint64_t b = next.fetch_add(1);
      if (b >= blocks) break;
      const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                      static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
      try {
        runner.run_block(idx, grid);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        // The lowest failing block wins, so the message does not depend on timing.
        if (b < error_block) {
          error_block = b;
          error = e.what();
        }
        stop = true;
      }
    }
  };

  std::vector<std::thread> pool;
  for (int i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (!error.empty()) throw Error("CUDA emulator: " + error + " [kernel " + kernel_name + "]");
}

}  // namespace dce::emu
