"""fusedmoe GPU check: compile (into the disk cache) every kernel config the selected tests and the bench use.
Worker i of n takes configs i, i+n, ... (run n of these in parallel; later processes load instead of compiling)."""
import sys

import kernels as K


def configs():
    out = []

    def add(kind, cfg):
        if (kind, cfg) not in out:
            out.append((kind, cfg))
    small = (16, 512, 256)
    flash = (256, 4096, 2048)
    forced = [None, (1, 1), (2, 1), (4, 1), (2, 2), (1, 2)]
    for fmt in ("nvfp4", "mxfp4"):
        for force in forced:
            for by_slot in (True, False):
                K.MOE_GEMV_FORCE = (force, force) if force else (None, None)
                K.MOE_GEMV_BY_SLOT = by_slot
                dims = [small] + ([flash] if force is None else [])
                for E, D, I in dims:
                    for T, k in ((1, 6), (2, 6), (3, 6), (4, 6), (1, 2), (12, 2), (1, 2), (4, 2), (3, 2), (2, 2)):
                        R = T * k
                        for cfg in K.moe_gemv_configs(fmt, R, E, D, I, 132, R <= K.GATHER_MAX_ROWS):
                            add("gemv", cfg)
                        K.MOE_GEMV_FUSED = True
                        for pf in (False, True):
                            K.MOE_GEMV_FUSED_PREFETCH = pf
                            f = K.moe_gemv_fused_config(fmt, R, E, D, I, 132)
                            if f is not None and by_slot and (not pf or (fmt, E) == ("nvfp4", 256)):
                                add("fused", f)
                        K.MOE_GEMV_FUSED, K.MOE_GEMV_FUSED_PREFETCH = False, False
                        if force is None and by_slot:       # the wgmma path of _moe_both_paths
                            for cfg in K.gemm_configs(fmt, R, E, D, I, K.pick_tile_n(T, k, E), 132):
                                add("gemm", cfg)
                            add("routing_gather", (E, k, 8, D))
                            add("routing_gather", (E, k, K.pick_tile_n(T, k, E), D))
                            add("combine", (k, D, True))
                            add("combine", (k, D, False))
    K.MOE_GEMV_FORCE = ((1, 1), (1, 1))                       # test_moe_gemv_fused_l2_prefetch_gives_the_same_bits
    K.MOE_GEMV_STAGES = 2
    for T in (1, 3, 4):
        for cfg in K.moe_gemv_configs("nvfp4", 6 * T, 16, 512, 256, 132, True):
            add("gemv", cfg)
        K.MOE_GEMV_FUSED = True
        for pf in (False, True):
            K.MOE_GEMV_FUSED_PREFETCH = pf
            add("fused", K.moe_gemv_fused_config("nvfp4", 6 * T, 16, 512, 256, 132))
        K.MOE_GEMV_FUSED, K.MOE_GEMV_FUSED_PREFETCH = False, False
    K.MOE_GEMV_STAGES = 4
    K.MOE_GEMV_FORCE = (None, None)
    K.MOE_GEMV_BY_SLOT = True
    return out


if __name__ == "__main__":
    me, n = int(sys.argv[1]), int(sys.argv[2])
    fns = dict(gemv=K._compile_moe_gemv, fused=K._compile_moe_gemv_fused, gemm=K._compile_gemm,
               routing_gather=K._compile_routing_gather, combine=K._compile_combine)
    cfgs = configs()
    if me == 0:
        print(f"precompile: {len(cfgs)} configs", flush=True)
    for kind, cfg in cfgs[me::n]:
        fns[kind](*cfg)
