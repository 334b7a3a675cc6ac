from qwen2.cli import main

main()
