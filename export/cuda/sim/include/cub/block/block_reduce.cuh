// cub::BlockReduce for the CPU simulator. As in cub, only thread 0 receives the sum; the others
// get a poison value, so a kernel that reads it elsewhere fails its test.
#pragma once
#include "../../../cuda_sim.h"

namespace cub {

template <class T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T values[kThreads];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  T Sum(T input) {
    const unsigned t = threadIdx.x;
    storage_.values[t] = input;
    __syncthreads();
    T all = T(0);
    if (t == 0)
      for (unsigned i = 0; i < (unsigned)kThreads; ++i) all += storage_.values[i];
    // No barrier here: as in cub, the caller syncs before the storage is reused.
    return t == 0 ? all : T(0x5A5A5A5Au);
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
