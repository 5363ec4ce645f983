/* The MoE's products for experts that many token rows hit (panels.c), as moe.c sees them. */
#ifndef V4C_NATIVE_PANELS_H
#define V4C_NATIVE_PANELS_H

#define V4C_PANEL 16 /* token rows per panel */

/* Whether this CPU runs the panel kernels (AVX2 + FMA). */
int v4c_panels_available(void);

/* Token rows x[0 .. c) of K floats each into ceil(c / 16) panels [K][16] at xp (64-byte aligned),
 * zero past row c. */
void v4c_pack_panels(const float *const *x, int c, long K, float *xp);

/* For weight rows i < n of gate and up ([n, K] each) against the c tokens in panels at xp: the
 * clamped SwiGLU min(g, lim) * sigmoid(min(g, lim)) * clamp(u, -lim, lim) of their products, into
 * panel form: ap[p * ldp + i * 16 + m] for token m of panel p (ap, ldp 32-byte aligned; lanes past
 * the last token undefined). */
void v4c_panel_swiglu(const float *gate, const float *up, long n, long K, const float *xp, int c, float lim,
                      float *ap, long ldp);

/* y[m * ldy + i] = dot(w row i, token m) for i < n (w [n, K]), m < c, the c tokens in panels at xp. */
void v4c_panel_rows(const float *w, long n, long K, const float *xp, int c, float *y, long ldy);

#endif
