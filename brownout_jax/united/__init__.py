"""United experts: how they are grouped, distilled on calibration data and attached after the
originals, and which MoE layers are exempt from brownout. (Routing tokens to them at run time
is ``moe.brownout``.)"""
