from crawl2chat.cli import main

main()
