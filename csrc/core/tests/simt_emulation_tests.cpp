// Tests of the SIMT emulation itself. Without an argument: kernels that depend on a real barrier
// and on per-block shared memory give CUDA's results. With the name of a misuse, that misuse runs
// and the emulation must stop it with its error message (CTest matches the message), not hang.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "gpu_launch.cuh"

namespace {

// Reverses each block's segment through shared memory: correct only if every thread's store is
// visible to every other thread after the barrier, and the array is the block's own.
__global__ void reverse_kernel(const int* in, int* out) {
  MK_SHARED(int, tile, [256]);
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = in[i];
  __syncthreads();
  out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

// Sums the block's values through dynamic shared memory, one barrier per halving step.
__global__ void block_sum_kernel(const float* in, float* out) {
  MK_DYNAMIC_SHARED(float, partial);
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Reads shared memory no thread wrote: the poison (NaN) must show.
__global__ void unwritten_shared_kernel(float* out) {
  MK_SHARED(float, tile, [32]);
  out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void large_shared_kernel(int* out) {
  MK_SHARED(double, big, [7000]);
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = int(big[threadIdx.x]);
}

__global__ void noop_kernel(int*) {}

// Every shuffle flavour on a 96-thread block (3 warps), each lane's result stored: out[mode][thread].
__global__ void shuffle_kernel(const double* in, double* out, int* lanes) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  const double v = in[t];
  const unsigned full = 0xFFFFFFFFu;
  out[0 * n + t] = __shfl_xor_sync(full, v, 5);
  out[1 * n + t] = __shfl_down_sync(full, v, 3);
  out[2 * n + t] = __shfl_up_sync(full, v, 2);
  out[3 * n + t] = __shfl_sync(full, v, 7);
  out[4 * n + t] = __shfl_xor_sync(full, v, 9, 8);   // width 8: xor 9 reaches the next segment: own value
  out[5 * n + t] = __shfl_down_sync(full, v, 1, 16);  // width 16: the segment's last lane keeps its value
  out[6 * n + t] = __shfl_sync(full, v, 19, 16);      // lane 19 % 16 = 3 of each 16-lane segment
  // A fixed-order butterfly sum: every lane gets the warp's total, bit for bit the same.
  double s = v;
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(full, s, offset);
  out[7 * n + t] = s;
  // Only the lower half-warp shuffles, with a mask naming just it; the upper half does not take part.
  if ((t & 31) < 16) out[8 * n + t] = __shfl_xor_sync(0x0000FFFFu, v, 1);
  else out[8 * n + t] = -1.0;
  lanes[t] = __shfl_sync(full, int(t) * 10, 31);
}

// Each block adds to a counter; the block that draws the last ticket writes the total of every
// block's slot and resets the counter, as the Gram kernels do.
__global__ void ticket_kernel(unsigned* ticket, double* slots, double* total, float* fsum) {
  MK_SHARED(int, last, [1]);
  if (threadIdx.x == 0) {
    slots[blockIdx.x] = double(blockIdx.x + 1);
    atomicAdd(fsum, 0.5f);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last[0] = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last[0]) return;
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += __ldcg(slots + b);
    *total = s;
    atomicExch(ticket, 0u);
  }
}

__global__ void atomic_inc_kernel(unsigned* counter) { atomicInc(counter, 4u); }

// Misuses of the shuffles: each must be reported, not hang.
__global__ void shuffle_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 1);
}
__global__ void shuffle_mask_kernel(int* out) {
  const unsigned mask = threadIdx.x == 3 ? 0x0000FFFFu : 0xFFFFFFFFu;
  out[threadIdx.x] = __shfl_xor_sync(mask, int(threadIdx.x), 1);
}
__global__ void shuffle_divergent_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 1);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 2);
  }
}
__global__ void shuffle_barrier_kernel(int* out) {
  if (threadIdx.x == 7) __syncthreads();
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 1);
}
__global__ void shuffle_own_lane_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFEu, int(threadIdx.x), 1);
}
__global__ void shuffle_source_kernel(int* out) {  // lane 0 reads lane 1, which the mask omits
  if (threadIdx.x % 32 == 0 || threadIdx.x % 32 == 2) out[threadIdx.x] = __shfl_xor_sync(0x5u, int(threadIdx.x), 1);
}
__global__ void shuffle_missing_lane_kernel(int* out) {  // a 40-thread block: warp 1 has lanes 0..7 only
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, int(threadIdx.x), 1);
}

// __ballot_sync (full and partial masks), __syncwarp, __popc and __ffs on a 96-thread block (3
// warps). Each lane reads its neighbour's shared-memory store after the __syncwarp: without the
// rendezvous lane 0 would run first and read the poison.
__global__ void ballot_kernel(const int* in, unsigned* votes, int* out) {
  MK_SHARED(int, slots, [96]);
  const unsigned t = threadIdx.x, n = blockDim.x;
  votes[t] = __ballot_sync(0xFFFFFFFFu, in[t] > 0);
  votes[n + t] = (t & 31) < 8 ? __ballot_sync(0x000000FFu, in[t] > 0) : 0xDEADu;
  slots[t] = in[t];
  __syncwarp();
  out[t] = slots[t ^ 1];
  out[n + t] = __popc(votes[t]);
  out[2 * n + t] = __ffs(int(votes[t]));
  __syncwarp(0xFFFFFFFFu);
}

// Misuses of the ballot and __syncwarp: each must be reported, not hang.
__global__ void ballot_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = int(__ballot_sync(0xFFFFFFFFu, threadIdx.x % 3 == 0));
}
__global__ void ballot_mask_kernel(int* out) {
  const unsigned mask = threadIdx.x == 4 ? 0x0000FFFFu : 0xFFFFFFFFu;
  out[threadIdx.x] = int(__ballot_sync(mask, 1));
}
__global__ void syncwarp_divergent_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncwarp();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}
__global__ void syncwarp_barrier_kernel(int* out) {
  if (threadIdx.x == 7) __syncthreads();
  __syncwarp();
  out[threadIdx.x] = 1;
}

void test_ballot_and_syncwarp() {
  const unsigned n = 96;
  std::vector<int> in(n), out(3 * n, -7);
  std::vector<unsigned> votes(2 * n, 0);
  for (unsigned i = 0; i < n; ++i) in[i] = (i * 7 + i / 32) % 5 == 0 ? 1 : -int(i);
  mk::launch_kernel(ballot_kernel, 1, n, 0, nullptr, in.data(), votes.data(), out.data());
  for (unsigned t = 0; t < n; ++t) {
    const unsigned lane = t % 32, warp = t - lane;
    unsigned expected = 0, low = 0;
    for (unsigned l = 0; l < 32; ++l) expected |= (in[warp + l] > 0 ? 1u : 0u) << l;
    for (unsigned l = 0; l < 8; ++l) low |= (in[warp + l] > 0 ? 1u : 0u) << l;
    CHECK(votes[t] == expected, "ballot: thread %u got 0x%08x, expected 0x%08x", t, votes[t], expected);
    CHECK(votes[n + t] == (lane < 8 ? low : 0xDEADu), "ballot with mask 0xff: thread %u got 0x%08x", t, votes[n + t]);
    CHECK(out[t] == in[t ^ 1], "__syncwarp: thread %u read %d from its neighbour, expected %d", t, out[t], in[t ^ 1]);
    CHECK(out[n + t] == __builtin_popcount(expected), "__popc: thread %u", t);
    CHECK(out[2 * n + t] == (expected ? __builtin_ctz(expected) + 1 : 0), "__ffs: thread %u", t);
  }
}

void test_shuffles_and_atomics() {
  const unsigned n = 96;
  std::vector<double> in(n), out(9 * n, 0.0);
  std::vector<int> lanes(n, 0);
  for (unsigned i = 0; i < n; ++i) in[i] = 1.0 + i * 0.25 + (i % 3) * 1e-9;
  mk::launch_kernel(shuffle_kernel, 1, n, 0, nullptr, in.data(), out.data(), lanes.data());
  for (unsigned t = 0; t < n; ++t) {
    const unsigned lane = t % 32, warp = t - lane;
    auto at = [&](unsigned l) { return in[warp + l]; };
    CHECK(out[0 * n + t] == at(lane ^ 5), "shfl_xor 5: thread %u", t);
    CHECK(out[1 * n + t] == (lane + 3 < 32 ? at(lane + 3) : in[t]), "shfl_down 3: thread %u", t);
    CHECK(out[2 * n + t] == (lane >= 2 ? at(lane - 2) : in[t]), "shfl_up 2: thread %u", t);
    CHECK(out[3 * n + t] == at(7), "shfl 7: thread %u", t);
    const unsigned x = lane ^ 9, seg8 = lane & ~7u;
    CHECK(out[4 * n + t] == (x >= seg8 + 8 ? in[t] : at(x)), "shfl_xor 9 width 8: thread %u", t);
    CHECK(out[5 * n + t] == ((lane & 15) + 1 < 16 ? at(lane + 1) : in[t]), "shfl_down 1 width 16: thread %u", t);
    CHECK(out[6 * n + t] == at((lane & ~15u) + 3), "shfl 19 width 16: thread %u", t);
    CHECK(std::memcmp(&out[7 * n + t], &out[7 * n + warp], sizeof(double)) == 0, "butterfly: thread %u differs", t);
    CHECK(out[8 * n + t] == (lane < 16 ? at(lane ^ 1) : -1.0), "half-warp mask: thread %u", t);
    CHECK(lanes[t] == int(warp + 31) * 10, "int shfl: thread %u got %d", t, lanes[t]);
  }
  double expected = 0.0;
  for (unsigned l = 0; l < 32; ++l) expected += in[l];
  CHECK(std::fabs(out[7 * n] - expected) < 1e-12, "butterfly total %.17g, expected %.17g", out[7 * n], expected);

  // Twice with the same counter: the last block's reset makes the second launch work too.
  unsigned ticket = 0;
  std::vector<double> slots(7, -1.0);
  double total = -1.0;
  float fsum = 0.0f;
  for (int rep = 0; rep < 2; ++rep) {
    total = -1.0;
    mk::launch_kernel(ticket_kernel, 7, 64, 0, nullptr, &ticket, slots.data(), &total, &fsum);
    CHECK(total == 28.0 && ticket == 0u, "ticket: total %g, counter %u after launch %d", total, ticket, rep);
  }
  CHECK(fsum == 7.0f, "atomicAdd(float): %g", fsum);
  unsigned counter = 0;
  mk::launch_kernel(atomic_inc_kernel, 1, 7, 0, nullptr, &counter);  // 0,1,2,3,4 then wraps: 0,1
  CHECK(counter == 2u, "atomicInc wraps at the limit: %u", counter);
}

void test_kernels() {
  const unsigned blocks = 3, threads = 256;
  std::vector<int> in(blocks * threads), out(blocks * threads, -1);
  for (unsigned i = 0; i < in.size(); ++i) in[i] = int(i);
  mk::launch_kernel(reverse_kernel, blocks, threads, 0, nullptr, in.data(), out.data());
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t)
      CHECK(out[b * threads + t] == int(b * threads + threads - 1 - t), "reverse: block %u thread %u", b, t);

  std::vector<float> values(blocks * 128), sums(blocks, -1.0f);
  for (unsigned i = 0; i < values.size(); ++i) values[i] = float(i % 7);
  mk::launch_kernel(block_sum_kernel, blocks, 128, 128 * sizeof(float), nullptr, values.data(), sums.data());
  for (unsigned b = 0; b < blocks; ++b) {
    float expected = 0.0f;
    for (unsigned t = 0; t < 128; ++t) expected += values[b * 128 + t];
    CHECK(sums[b] == expected, "block sum %u: %g, expected %g", b, sums[b], expected);
  }

  std::vector<float> unwritten(32, 0.0f);
  mk::launch_kernel(unwritten_shared_kernel, 1, 32, 0, nullptr, unwritten.data());
  for (float x : unwritten) CHECK(x != x, "unwritten shared memory reads as NaN, not %g", x);
  test_shuffles_and_atomics();
  test_ballot_and_syncwarp();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> out(2048);
  if (argc < 2) {
    test_kernels();
    if (failures) std::printf("%d checks failed\n", failures);
    return failures ? 1 : 0;
  }
  const char* misuse = argv[1];
  if (!std::strcmp(misuse, "early-exit")) mk::launch_kernel(early_exit_kernel, 2, 64, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "divergent-barrier"))
    mk::launch_kernel(divergent_barrier_kernel, 1, 64, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "static-shared")) mk::launch_kernel(large_shared_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "dynamic-shared"))
    mk::launch_kernel(noop_kernel, 1, 32, 48 * 1024 + 1, nullptr, out.data());
  if (!std::strcmp(misuse, "block-size")) mk::launch_kernel(noop_kernel, 1, 1025, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "grid-y")) mk::launch_kernel(noop_kernel, dim3(1, 65536), 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-exit")) mk::launch_kernel(shuffle_exit_kernel, 1, 64, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-mask")) mk::launch_kernel(shuffle_mask_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-divergent"))
    mk::launch_kernel(shuffle_divergent_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-barrier"))
    mk::launch_kernel(shuffle_barrier_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-own-lane"))
    mk::launch_kernel(shuffle_own_lane_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-source"))
    mk::launch_kernel(shuffle_source_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "shuffle-missing-lane"))
    mk::launch_kernel(shuffle_missing_lane_kernel, 1, 40, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "ballot-exit")) mk::launch_kernel(ballot_exit_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "ballot-mask")) mk::launch_kernel(ballot_mask_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "syncwarp-divergent"))
    mk::launch_kernel(syncwarp_divergent_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "syncwarp-barrier"))
    mk::launch_kernel(syncwarp_barrier_kernel, 1, 32, 0, nullptr, out.data());
  std::printf("misuse %s was not reported\n", misuse);
  return 1;
}
