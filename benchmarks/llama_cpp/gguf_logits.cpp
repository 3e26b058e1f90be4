// The logits llama.cpp computes for a GGUF file: every position of one prompt of token ids.
//
// Built by benchmarks/gguf_families_llama_cpp.py against a llama.cpp build
// (never a dependency of ftq): `gguf_logits MODEL.gguf OUT.f32 ID ID ...`
// writes [positions, vocab] float32 logits to OUT.f32.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL.gguf OUT.f32 TOKEN_ID...\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (model == nullptr) {
        std::fprintf(stderr, "llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    std::vector<llama_token> ids;
    for (int i = 3; i < argc; ++i) ids.push_back(static_cast<llama_token>(std::atoi(argv[i])));
    llama_context_params context_params = llama_context_default_params();
    context_params.n_ctx = static_cast<uint32_t>(ids.size() + 8);
    context_params.n_batch = static_cast<uint32_t>(ids.size());
    context_params.n_threads = 2;
    llama_context * context = llama_init_from_model(model, context_params);
    llama_batch batch = llama_batch_init(static_cast<int32_t>(ids.size()), 0, 1);
    for (size_t i = 0; i < ids.size(); ++i) {
        batch.token[i] = ids[i];
        batch.pos[i] = static_cast<llama_pos>(i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;  // every position's logits, not only the last
    }
    batch.n_tokens = static_cast<int32_t>(ids.size());
    if (llama_decode(context, batch) != 0) {
        std::fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const int32_t vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::FILE * out = std::fopen(argv[2], "wb");
    for (size_t i = 0; i < ids.size(); ++i) {
        std::fwrite(llama_get_logits_ith(context, static_cast<int32_t>(i)), sizeof(float), vocab, out);
    }
    std::fclose(out);
    llama_batch_free(batch);
    llama_free(context);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
