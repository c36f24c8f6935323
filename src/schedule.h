// Learning-rate schedule: linear warmup from lr/warmup to lr over `warmup` steps, then cosine,
// linear or constant decay to lr * final_frac at the last step.
#pragma once
#include <cmath>
#include <string>

#include "check.h"

struct LrSchedule {
    float lr, final_frac;
    int warmup, total;
    std::string kind;  // cosine | linear | constant
    float at(int step) const {  // step is 0-based
        if (step < warmup) return lr * (step + 1) / warmup;
        if (kind == "constant" || total <= warmup) return lr;
        float progress = (float)(step - warmup) / (float)(total - warmup);
        if (progress > 1.0f) progress = 1.0f;
        float floor = lr * final_frac;
        if (kind == "linear") return lr - (lr - floor) * progress;
        CHECK(kind == "cosine", "--schedule %s: expected cosine, linear or constant", kind.c_str());
        return floor + 0.5f * (lr - floor) * (1.0f + std::cos(3.14159265358979f * progress));
    }
};
