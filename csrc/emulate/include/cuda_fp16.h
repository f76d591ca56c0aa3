// Host emulation stand-in for the CUDA header of this name (see fastattn_emulate.h).
#pragma once
#include "fastattn_emulate.h"
