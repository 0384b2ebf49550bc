// Stands in for the CUDA runtime header when arm_cuda.cu is built for the CPU simulator.
#pragma once
#include "../cuda_sim.h"
