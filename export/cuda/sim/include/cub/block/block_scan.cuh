// cub::BlockScan for the CPU simulator: the collective calls the kernels make, same results.
#pragma once
#include "../../../cuda_sim.h"

namespace cub {

template <class T, int kThreads>
class BlockScan {
 public:
  struct TempStorage {
    T values[kThreads];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& aggregate) {
    const unsigned t = threadIdx.x;
    storage_.values[t] = input;
    __syncthreads();
    T below = T(0), all = T(0);
    for (unsigned i = 0; i < (unsigned)kThreads; ++i) {
      if (i < t) below += storage_.values[i];
      all += storage_.values[i];
    }
    // No barrier here: as in cub, the caller syncs before the storage is reused.
    output = below;
    aggregate = all;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
