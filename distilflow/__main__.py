from distilflow.cli import main

# The guard matters: vLLM (generate.backend vllm in this process) spawns its engine process, which
# imports this module again under another name; it must not run the command a second time.
if __name__ == "__main__":
    raise SystemExit(main())
