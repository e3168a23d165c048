// The SIMT emulation's scheduler (simt_emulation.h describes the semantics). One OS thread runs a
// launch block by block; within a block, each CUDA thread is a fiber with its own stack. A round
// resumes every live fiber once and lets it run until it reaches a barrier or returns, so a barrier
// is passed only after the whole block has arrived, and a block that can never pass one is
// detected at the end of the round instead of waiting forever.
//
// The switch is a few instructions of x86-64 assembly (callee-saved registers, the SSE and x87
// control words, the stack pointer): glibc's swapcontext also saves the signal mask with a system
// call, which made it most of the suite's run time.
#include "simt_emulation.h"

#include <sys/mman.h>

#if !defined(__x86_64__)
#error "the SIMT emulation's context switch is written for x86-64"
#endif

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MK_SIMT_ASAN 1
#endif

// mk_simt_switch(from, to): saves the running context's stack pointer to *from and resumes the
// context whose stack pointer is `to` (one suspended by mk_simt_switch, or a new one from
// new_context).
extern "C" void mk_simt_switch(void** from, void* to);
asm(R"(
  .text
  .globl mk_simt_switch
  .type mk_simt_switch, @function
mk_simt_switch:
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
  .size mk_simt_switch, .-mk_simt_switch
)");

namespace mk {
namespace simt {
namespace {

// AddressSanitizer's instrumented frames are several times larger.
#if defined(MK_SIMT_ASAN)
constexpr size_t kStackBytes = 1024 * 1024;
#else
constexpr size_t kStackBytes = 256 * 1024;
#endif
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 2147483647u, kMaxGridYZ = 65535;

enum class FiberState { running, at_barrier, at_shuffle, exited };

struct Fiber {
  void* context = nullptr;  // the saved stack pointer
  void* stack = nullptr;
  FiberState state = FiberState::running;
  const char* barrier_file = nullptr;  // the barrier's or the shuffle's source position
  int barrier_line = 0;
  // A shuffle this fiber waits at: mode, mask, its argument (lane, lane mask or delta), width, value.
  ShuffleMode shuffle_mode = ShuffleMode::index;
  unsigned shuffle_mask = 0;
  int shuffle_argument = 0, shuffle_width = 32;
  uint64_t shuffle_value = 0, shuffle_result = 0;
#if defined(MK_SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct StaticSlot {
  const char* file;
  int line;
  size_t offset;
};

// Everything one OS thread needs to run blocks; the fiber stacks are kept for later launches.
struct Scheduler {
  std::vector<Fiber> fibers;
  void* context = nullptr;
  const std::function<void()>* thread = nullptr;
  unsigned current = 0;
  bool in_kernel = false;
  // Shared memory of the running block: the dynamic part first, static arrays after it.
  alignas(16) unsigned char shared[kMaxSharedBytesPerBlock];
  size_t dynamic_bytes = 0, shared_used = 0;
  std::vector<StaticSlot> static_slots;
#if defined(MK_SIMT_ASAN)
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
#endif
};

thread_local Scheduler scheduler;
int emulated_multiprocessors = 2;

uint3 unflatten(uint64_t i, dim3 extent) {
  return uint3{unsigned(i % extent.x), unsigned(i / extent.x % extent.y), unsigned(i / extent.x / extent.y)};
}

void switch_to_fiber(Fiber& fiber) {
#if defined(MK_SIMT_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber.stack, kStackBytes);
#endif
  mk_simt_switch(&scheduler.context, fiber.context);
#if defined(MK_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Back to the scheduler from the running fiber; a fiber that has exited is never resumed.
void switch_to_scheduler(Fiber& fiber) {
#if defined(MK_SIMT_ASAN)
  const bool exiting = fiber.state == FiberState::exited;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber.fake_stack, scheduler.stack_bottom,
                                 scheduler.stack_size);
#endif
  mk_simt_switch(&fiber.context, scheduler.context);
#if defined(MK_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fiber.fake_stack, nullptr, nullptr);
#endif
}


const char* shuffle_name(ShuffleMode mode) {
  switch (mode) {
    case ShuffleMode::index: return "__shfl_sync";
    case ShuffleMode::xor_: return "__shfl_xor_sync";
    case ShuffleMode::down: return "__shfl_down_sync";
    case ShuffleMode::up: return "__shfl_up_sync";
    case ShuffleMode::ballot: return "__ballot_sync";
    default: return "__syncwarp";
  }
}

// The lane whose value lane `lane` receives (CUDA's rules; itself where the source is out of range).
unsigned shuffle_source(const Fiber& f, unsigned lane) {
  const unsigned w = unsigned(f.shuffle_width), segment = lane & ~(w - 1);
  const unsigned arg = unsigned(f.shuffle_argument);
  switch (f.shuffle_mode) {
    case ShuffleMode::index: return segment + (arg & (w - 1));
    case ShuffleMode::xor_: {
      const unsigned source = lane ^ arg;  // earlier segments may be read, later ones not
      return source >= segment + w ? lane : source;
    }
    case ShuffleMode::down: return (lane & (w - 1)) + arg >= w ? lane : lane + arg;
    default: return (lane & (w - 1)) < arg ? lane : lane - arg;
  }
}

// Whether every lane that the shuffle of thread i names waits at that same shuffle with the same
// mask and width. A named lane that can never arrive (missing, exited, at a barrier) is fatal at
// once; one at another shuffle may still come (after that one completes), so with `report` unset
// the group is only not ready, and with it set the inconsistency is reported.
bool group_ready(unsigned i, unsigned threads, bool report) {
  const Fiber& f = scheduler.fibers[i];
  const unsigned base = i & ~31u;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.shuffle_mask >> l & 1u)) continue;
    const unsigned other = base + l;
    if (other >= threads)
      fail("block (%u, %u, %u): the %s of %s:%d by thread %u names lane %u of its warp in mask 0x%08x, but the "
           "block has no thread %u", blockIdx.x, blockIdx.y, blockIdx.z, shuffle_name(f.shuffle_mode),
           f.barrier_file, f.barrier_line, i, l, f.shuffle_mask, other);
    const Fiber& o = scheduler.fibers[other];
    if (o.state == FiberState::exited)
      fail("block (%u, %u, %u): the %s of %s:%d by thread %u names lane %u in mask 0x%08x, but thread %u exited",
           blockIdx.x, blockIdx.y, blockIdx.z, shuffle_name(f.shuffle_mode), f.barrier_file, f.barrier_line, i, l,
           f.shuffle_mask, other);
    if (o.state == FiberState::at_barrier)
      fail("block (%u, %u, %u): the %s of %s:%d by thread %u names thread %u, which waits at the __syncthreads() "
           "of %s:%d", blockIdx.x, blockIdx.y, blockIdx.z, shuffle_name(f.shuffle_mode), f.barrier_file,
           f.barrier_line, i, other, o.barrier_file, o.barrier_line);
    if (o.barrier_line != f.barrier_line || std::strcmp(o.barrier_file, f.barrier_file) != 0 ||
        o.shuffle_mode != f.shuffle_mode) {
      if (!report) return false;
      fail("block (%u, %u, %u): lanes of one warp at different shuffles: thread %u at the %s of %s:%d, thread %u "
           "at the %s of %s:%d", blockIdx.x, blockIdx.y, blockIdx.z, i, shuffle_name(f.shuffle_mode),
           f.barrier_file, f.barrier_line, other, shuffle_name(o.shuffle_mode), o.barrier_file, o.barrier_line);
    }
    if (o.shuffle_mask != f.shuffle_mask || o.shuffle_width != f.shuffle_width) {
      if (!report) return false;
      fail("block (%u, %u, %u): inconsistent masks at the %s of %s:%d: thread %u passes 0x%08x (width %d), "
           "thread %u 0x%08x (width %d)", blockIdx.x, blockIdx.y, blockIdx.z, shuffle_name(f.shuffle_mode),
           f.barrier_file, f.barrier_line, i, f.shuffle_mask, f.shuffle_width, other, o.shuffle_mask,
           o.shuffle_width);
    }
  }
  return true;
}

// Called when every live fiber waits at a barrier or a shuffle: completes every shuffle whose
// named lanes are all there (they run again in the next round). If fibers wait at shuffles and
// none can complete, the block could never go on: the first inconsistency is reported.
// Returns whether some fiber waited at a shuffle.
bool resolve_shuffles(unsigned threads) {
  bool any = false, resolved = false;
  unsigned first = 0;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = scheduler.fibers[i];
    if (f.state != FiberState::at_shuffle) continue;
    if (!any) first = i;
    any = true;
    if (!group_ready(i, threads, false)) continue;
    // Every named lane is here: each gets its source lane's value (a ballot: the named lanes'
    // predicate bits), then all run on.
    const unsigned base = i & ~31u;
    const unsigned mask = f.shuffle_mask;
    uint64_t votes = 0;
    for (unsigned l = 0; l < 32; ++l)
      if (mask >> l & 1u && scheduler.fibers[base + l].shuffle_value != 0) votes |= uint64_t(1) << l;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& o = scheduler.fibers[base + l];
      if (o.shuffle_mode == ShuffleMode::ballot || o.shuffle_mode == ShuffleMode::sync) {
        o.shuffle_result = o.shuffle_mode == ShuffleMode::ballot ? votes : 0;
        continue;
      }
      const unsigned source = shuffle_source(o, l);
      if (!(mask >> source & 1u))
        fail("block (%u, %u, %u): at the %s of %s:%d lane %u reads lane %u, which is not in mask 0x%08x",
             blockIdx.x, blockIdx.y, blockIdx.z, shuffle_name(o.shuffle_mode), o.barrier_file, o.barrier_line, l,
             source, mask);
      o.shuffle_result = scheduler.fibers[base + source].shuffle_value;
    }
    for (unsigned l = 0; l < 32; ++l)
      if (mask >> l & 1u) scheduler.fibers[base + l].state = FiberState::running;
    resolved = true;
  }
  if (any && !resolved) group_ready(first, threads, true);
  return any;
}

[[noreturn]] void fiber_main() {
  Fiber& fiber = scheduler.fibers[scheduler.current];
#if defined(MK_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack_bottom, &scheduler.stack_size);
#endif
  (*scheduler.thread)();
  fiber.state = FiberState::exited;
  switch_to_scheduler(fiber);
  __builtin_unreachable();
}

// A context that starts in fiber_main on the top of `stack`, laid out as mk_simt_switch leaves a
// suspended one: the control words, six registers, then the return address, with the stack
// aligned as at a call.
void* new_context(void* stack) {
  uint64_t* top = reinterpret_cast<uint64_t*>(static_cast<char*>(stack) + kStackBytes);
  *--top = 0;  // fiber_main's own return address: it never returns
  *--top = reinterpret_cast<uint64_t>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--top = 0;
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  *--top = uint64_t(control[0]) | uint64_t(control[1]) << 32;
  return top;
}

void reserve_fibers(unsigned n) {
  while (scheduler.fibers.size() < n) {
    Fiber fiber;
    fiber.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fiber.stack == MAP_FAILED) fail("cannot map a %zu-byte fiber stack", kStackBytes);
    scheduler.fibers.push_back(fiber);
  }
}

void run_block(dim3 block, unsigned threads) {
  std::memset(scheduler.shared, 0xFF, sizeof scheduler.shared);
  scheduler.shared_used = scheduler.dynamic_bytes;
  scheduler.static_slots.clear();
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& fiber = scheduler.fibers[i];
    fiber.context = new_context(fiber.stack);
    fiber.state = FiberState::running;
  }
  for (unsigned round = 0;; ++round) {
    const bool descending = round % 2 == 1;
    for (unsigned n = 0; n < threads; ++n) {
      const unsigned i = descending ? threads - 1 - n : n;
      Fiber& fiber = scheduler.fibers[i];
      if (fiber.state != FiberState::running) continue;  // exited, or still waiting
      scheduler.current = i;
      threadIdx = unflatten(i, block);
      switch_to_fiber(fiber);
    }
    if (resolve_shuffles(threads)) continue;
    unsigned waiting = 0, first_waiting = 0;
    for (unsigned i = 0; i < threads; ++i) {
      const Fiber& fiber = scheduler.fibers[i];
      if (fiber.state != FiberState::at_barrier) continue;
      if (waiting++ == 0) {
        first_waiting = i;
        continue;
      }
      const Fiber& first = scheduler.fibers[first_waiting];
      if (fiber.barrier_line != first.barrier_line || std::strcmp(fiber.barrier_file, first.barrier_file) != 0)
        fail("block (%u, %u, %u): thread %u waits at the __syncthreads() of %s:%d, thread %u at the one of %s:%d",
             blockIdx.x, blockIdx.y, blockIdx.z, first_waiting, first.barrier_file, first.barrier_line, i,
             fiber.barrier_file, fiber.barrier_line);
    }
    if (waiting == 0) return;
    if (waiting != threads) {
      const Fiber& first = scheduler.fibers[first_waiting];
      fail("block (%u, %u, %u): the __syncthreads() of %s:%d is reached by %u of its %u threads; the others exited",
           blockIdx.x, blockIdx.y, blockIdx.z, first.barrier_file, first.barrier_line, waiting, threads);
    }
    for (unsigned i = 0; i < threads; ++i)  // the barrier opens
      if (scheduler.fibers[i].state == FiberState::at_barrier) scheduler.fibers[i].state = FiberState::running;
  }
}

}  // namespace

void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "SIMT emulation error: ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(86);
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& thread) {
  if (scheduler.in_kernel) fail("a kernel launched from inside a kernel");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
    fail("block (%u, %u, %u): a block has 1..1024 threads, x and y <= 1024, z <= 64", block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    fail("grid (%u, %u, %u): a grid has x in 1..2^31-1, y and z in 1..65535", grid.x, grid.y, grid.z);
  if (dynamic_shared_bytes > kMaxSharedBytesPerBlock)
    fail("%zu bytes of dynamic shared memory: above the %zu a block gets without the opt-in", dynamic_shared_bytes,
         kMaxSharedBytesPerBlock);
  reserve_fibers(unsigned(threads));
  scheduler.thread = &thread;
  scheduler.dynamic_bytes = dynamic_shared_bytes;
  scheduler.in_kernel = true;
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t b = blocks; b-- > 0;) {
    blockIdx = unflatten(b, grid);
    run_block(block, unsigned(threads));
  }
  scheduler.in_kernel = false;
}

void sync_threads(const char* file, int line) {
  if (!scheduler.in_kernel) fail("__syncthreads() at %s:%d called outside a kernel", file, line);
  Fiber& fiber = scheduler.fibers[scheduler.current];
  fiber.state = FiberState::at_barrier;
  fiber.barrier_file = file;
  fiber.barrier_line = line;
  switch_to_scheduler(fiber);
}

uint64_t shuffle_bits(const char* file, int line, ShuffleMode mode, unsigned mask, uint64_t bits, int argument,
                      int width) {
  if (!scheduler.in_kernel) fail("%s at %s:%d called outside a kernel", shuffle_name(mode), file, line);
  Fiber& fiber = scheduler.fibers[scheduler.current];
  const unsigned lane = scheduler.current & 31u;
  if (!(mask >> lane & 1u))
    fail("block (%u, %u, %u): thread %u calls the %s of %s:%d with mask 0x%08x, which omits its own lane %u",
         blockIdx.x, blockIdx.y, blockIdx.z, scheduler.current, shuffle_name(mode), file, line, mask, lane);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("%s at %s:%d: width %d is not a power of 2 in 1..32", shuffle_name(mode), file, line, width);
  if (argument < 0 && mode != ShuffleMode::index)
    fail("%s at %s:%d: negative lane argument %d", shuffle_name(mode), file, line, argument);
  fiber.state = FiberState::at_shuffle;
  fiber.barrier_file = file;
  fiber.barrier_line = line;
  fiber.shuffle_mode = mode;
  fiber.shuffle_mask = mask;
  fiber.shuffle_argument = argument;
  fiber.shuffle_width = width;
  fiber.shuffle_value = bits;
  switch_to_scheduler(fiber);
  return fiber.shuffle_result;
}

int multiprocessor_count() { return emulated_multiprocessors; }
void set_multiprocessor_count(int count) {
  if (count < 1) fail("set_multiprocessor_count(%d): a device has at least one SM", count);
  emulated_multiprocessors = count;
}

void* static_shared_bytes(const char* file, int line, size_t bytes, size_t alignment) {
  if (!scheduler.in_kernel) fail("__shared__ array of %s:%d declared outside a kernel", file, line);
  for (const StaticSlot& slot : scheduler.static_slots)
    if (slot.line == line && std::strcmp(slot.file, file) == 0) return scheduler.shared + slot.offset;
  const size_t offset = (scheduler.shared_used + alignment - 1) / alignment * alignment;
  if (offset + bytes > kMaxSharedBytesPerBlock)
    fail("__shared__ array of %s:%d: the block's shared memory exceeds %zu bytes", file, line,
         kMaxSharedBytesPerBlock);
  scheduler.shared_used = offset + bytes;
  scheduler.static_slots.push_back({file, line, offset});
  return scheduler.shared + offset;
}

void* dynamic_shared_bytes() {
  if (!scheduler.in_kernel) fail("dynamic shared memory used outside a kernel");
  return scheduler.shared;
}

}  // namespace simt
}  // namespace mk
