"""Solutions to chapter 6's exercises. Run: python walkthrough/solutions/06_conv_and_state.py"""

import numpy as np


def my_conv(x, w, state):  # the chapter's causal depthwise convolution
    K = w.shape[1]
    window = np.concatenate([state, x])
    y = np.zeros_like(x)
    for t in range(len(x)):
        y[t] = np.sum(window[t : t + K] * w.T, axis=0)
    return y, window[len(window) - (K - 1) :]


# Exercise 6.1 -------------------------------------------------------------------------------
# Output t takes w[j] · x[t − (K−1) + j]: row t of M has w[j] in column t − (K−1) + j (if ≥ 0).
def exercise_6_1(x_channel, w_channel):
    T, K = len(x_channel), len(w_channel)
    M = np.zeros((T, T), dtype=x_channel.dtype)
    for t in range(T):
        for j in range(K):
            col = t - (K - 1) + j
            if col >= 0:
                M[t, col] = w_channel[j]
    return M


rng = np.random.default_rng(0)
K, C = 4, 6
w = rng.normal(size=(C, K)).astype(np.float32)
x = rng.normal(size=(20, C)).astype(np.float32)
whole, _ = my_conv(x, w, np.zeros((K - 1, C), np.float32))
M = exercise_6_1(x[:, 2], w[2])
np.testing.assert_allclose(M @ x[:, 2], whole[:, 2], rtol=1e-5, atol=1e-5)
print("Exercise 6.1: the conv of one channel is a banded lower-triangular (Toeplitz) matrix:")
print(M[:6, :6])


# Exercise 6.2 -------------------------------------------------------------------------------
def exercise_6_2(tokens_list=(1, 32768), bytes_per_number=4):
    conv_dim = 2 * 16 * 128 + 16 * 128  # q, k, v channels
    delta = 18 * ((4 - 1) * conv_dim + 16 * 128 * 128)
    return tuple((delta + 6 * 2 * 2 * 256 * tokens) * bytes_per_number for tokens in tokens_list)


one, many = exercise_6_2()
print(f"Exercise 6.2: Qwen3.5-0.8B decode state in float32: {one / 2**20:.1f} MiB after 1 token, "
      f"{many / 2**20:.0f} MiB after 32,768 (the DeltaNet part stays {(18 * (3 * 6144 + 16 * 128 * 128) * 4) / 2**20:.1f} MiB)")
assert one == 18 * (3 * 6144 + 16 * 128 * 128) * 4 + 6 * 2 * 2 * 256 * 4
