from qwen2.server.cli import main

main()
